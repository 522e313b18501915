"""Config loading: every malformed value is one clear line naming its field."""

import subprocess
import sys
from pathlib import Path

import pytest

from llm.cli import main
from llm.config import ConfigError, apply_overrides, build_config
from llm.models.config import ModelConfig, load_model_config

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted((ROOT / "llm" / "presets" / "models").glob("*.yaml"))


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_shipped_model_configs_load(path):
    cfg = load_model_config(path)
    assert cfg.d_model % cfg.n_heads == 0


BAD = {
    "wrong_type": ("n_layers: twelve", "model.n_layers", "expected an integer"),
    "negative_size": ("d_model: -768", "model.d_model", "must be > 0"),
    "unknown_key": ("n_layer: 12", "model.n_layer", "unknown key"),
    "heads_not_dividing": ("d_model: 768\nn_heads: 7", "model.n_heads", "does not divide d_model=768"),
    "rotary_odd_head_dim": (
        "d_model: 30\nn_heads: 2\nposition: rotary",
        "model.position",
        "rotary needs an even head dim",
    ),
    "bad_choice": ("norm: batchnorm", "model.norm", "expected one of"),
    "bool_as_int": ("n_layers: true", "model.n_layers", "expected an integer"),
    "kv_heads_not_dividing": ("n_heads: 12\nn_kv_heads: 5", "model.n_kv_heads", "does not divide n_heads=12"),
    "not_yaml": ("d_model: [768", None, "not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_config_is_one_clear_line(name, tmp_path, capsys):
    text, field, message = BAD[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text + "\n")
    assert main(["model", "info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("llm: error: ")
    assert message in err
    assert (field or str(path)) in err


def test_cli_error_has_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("d_model: 768\nn_heads: 7\n")
    proc = subprocess.run(
        [sys.executable, "-m", "llm", "model", "info", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "llm: error: model.n_heads: 7 does not divide d_model=768"


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_model_config(tmp_path / "nope.yaml")


def test_overrides_are_parsed_as_yaml_and_validated():
    data = apply_overrides({"d_model": 64, "n_heads": 4}, ["n_layers=3", "norm_eps=1e-6", "bias=false"])
    cfg = build_config(ModelConfig, data, "model")
    assert (cfg.n_layers, cfg.norm_eps, cfg.bias) == (3, 1e-6, False)
    with pytest.raises(ConfigError, match=r"model\.n_heads: 5 does not divide d_model=64"):
        build_config(ModelConfig, apply_overrides(data, ["n_heads=5"]), "model")
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["n_layers"])


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML reads `1e-5` as a string; the loader accepts it for a float field.
    assert build_config(ModelConfig, {"norm_eps": "1e-5"}).norm_eps == 1e-5
    with pytest.raises(ConfigError, match="norm_eps: expected a number"):
        build_config(ModelConfig, {"norm_eps": "small"}, "model")


def test_task_and_family_must_agree():
    from llm.tasks import get_task

    with pytest.raises(ConfigError, match="model.family"):
        get_task("image_classification").check(build_config(ModelConfig, {"family": "gpt"}, "model"))
    with pytest.raises(ConfigError, match="model.causal"):
        get_task("masked_lm").check(build_config(ModelConfig, {"family": "bert", "causal": True}, "model"))
    with pytest.raises(ConfigError, match="task: unknown task 'pretraining'"):
        get_task("pretraining")


@pytest.mark.parametrize(
    "text, key, first, again",
    [
        (
            "model:\n  base: gpt2-tiny\ntrain:\n  max_steps: 5\n  micro_batch_size: 2\n  max_steps: 7\n",
            "max_steps",
            4,
            6,
        ),
        ("run_dir: a\nmodel: {base: gpt2-tiny}\nrun_dir: b\n", "run_dir", 1, 3),
        ("model: {base: gpt2-tiny, d_model: 64, d_model: 32}\n", "d_model", 1, 1),
    ],
)
def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path, capsys, text, key, first, again):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert main(["pretrain", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"llm: error: {path}: not valid YAML (line {again}, ")
    assert f"duplicate key {key!r}: first on line {first}, again on line {again}" in err and str(path) in err


def test_a_deepspeed_preset_with_a_key_twice_is_refused(tmp_path):
    from llm.train.engine import load_preset

    preset = tmp_path / "dup.json"
    preset.write_text('{"zero_optimization": {"stage": 1, "stage": 3}}')
    with pytest.raises(ConfigError, match="dup.json: duplicate key 'stage'"):
        load_preset(str(preset))
