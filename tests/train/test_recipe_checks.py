"""Everything about a recipe is checked before any process group: files, vocabularies, batch arithmetic
for the launcher's world size, blends, a resume's checkpoint; `--set` takes several pairs, `--dry-run`
prints the resolved recipe and the DeepSpeed JSON."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import yaml

from llm.cli import main
from llm.config import ConfigError
from llm.run.checks import check_resume
from llm.run.recipe import resolve_recipe
from llm.run.train import check_recipe
from tests.train.helpers import TINY, run, write_recipe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 300-id BPE tokenizer and two shard directories made with it: text/ and code/."""
    from llm.data import prepare, train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    files = {}
    for name, line in (("text", "the cat sat on the mat. "), ("code", "def f(x): return x + 1\n")):
        (root / f"{name}.txt").write_text(line * 400)
        files[name] = root / f"{name}.txt"
    tok = train_tokenizer(list(files.values()), root / "tok", vocab_size=300)
    for name, path in files.items():
        prepare([path], tok, root / name, workers=1)
    return root


def shard_recipe(corpus, **data):
    recipe = copy.deepcopy(TINY)
    recipe["model"]["vocab_size"] = 300
    recipe["data"] = {"train": str(corpus / "text" / "train"), "tokenizer": str(corpus / "tok"), "seq_len": 16,
                      **data}  # fmt: skip
    return recipe


def check(recipe: dict):
    return check_recipe(resolve_recipe(recipe))


def test_a_recipe_with_shards_and_its_tokenizer_passes(corpus):
    assert check(shard_recipe(corpus)).name == "causal_lm"


def test_missing_tokenizer_is_named_with_the_one_the_shards_were_made_with(corpus, tmp_path):
    recipe = shard_recipe(corpus, tokenizer=str(tmp_path / "nope" / "tokenizer.json"))
    recipe["logging"] = {"sample_prompt": "def "}
    with pytest.raises(ConfigError, match=r"^data.tokenizer: .*nope/tokenizer.json: tokenizer file not found; "
                                          r"the shards were made with .*tok/tokenizer.json"):  # fmt: skip
        check(recipe)


def test_tokenizer_larger_than_the_model_vocabulary(corpus):
    from llm.data import Tokenizer

    size = Tokenizer(corpus / "tok").vocab_size
    recipe = shard_recipe(corpus)
    recipe["model"]["vocab_size"] = size - 1
    with pytest.raises(ConfigError, match=rf"^model.vocab_size: {size - 1} is smaller than the tokenizer's {size} ids"):
        check(recipe)


def test_shards_beyond_the_model_vocabulary(corpus):
    recipe = shard_recipe(corpus, tokenizer=None)
    recipe["model"]["vocab_size"] = 257
    with pytest.raises(ConfigError, match=r"^data.train: .*vocabulary of \d+ ids, the model has 257"):
        check(recipe)


def test_missing_shard_directories_are_named(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"^data.val: .*no such directory"):
        check(shard_recipe(corpus, val=str(tmp_path / "val")))
    with pytest.raises(ConfigError, match=r"^data.train: .*no such directory and data.prepare is not set"):
        check(shard_recipe(corpus, train=str(tmp_path / "train")))
    blend = [{"path": str(corpus / "text" / "train")}, {"path": str(tmp_path / "gone"), "weight": 2}]
    with pytest.raises(ConfigError, match=r"^data.train\[1\].path: .*gone: no such directory"):
        check(shard_recipe(corpus, train=blend))


def test_prepare_will_make_the_tokenizer_and_shards(tmp_path):
    recipe = copy.deepcopy(TINY)
    recipe["model"]["vocab_size"] = 512
    recipe["data"] = {"train": str(tmp_path / "d" / "train"), "tokenizer": str(tmp_path / "d" / "tokenizer.json"),
                      "seq_len": 16, "prepare": {"vocab_size": 512}}  # fmt: skip
    check(recipe)
    recipe["data"]["prepare"]["vocab_size"] = 1024
    with pytest.raises(ConfigError, match=r"^data.prepare.vocab_size: 1024 tokens do not fit model.vocab_size=512"):
        check(recipe)


def test_global_batch_uses_the_launchers_world_size(monkeypatch):
    recipe = copy.deepcopy(TINY)
    recipe["train"] = dict(TINY["train"], micro_batch_size=4, grad_accum=2, global_batch_size=16)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"^train.global_batch_size: 16 != .* x 1 data-parallel ranks = 8"):
        check(recipe)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check(recipe)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"x 3 data-parallel ranks = 24"):
        check(recipe)


def test_unknown_preset_fails_in_the_check():
    recipe = dict(TINY, deepspeed={"preset": "zero9"})
    with pytest.raises(ConfigError, match=r"^deepspeed.preset: 'zero9' is neither a file nor a preset"):
        check(recipe)


def test_set_takes_several_pairs_and_dry_run_prints_recipe_and_deepspeed_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = write_recipe(tmp_path / "r.yaml", dict(TINY, run_dir=str(tmp_path / "run")))
    argv = ["pretrain", str(path), "--set", "train.max_steps=7", "seed=5", "--set", "train.grad_accum=3",
            "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    head, _, ds = out.partition("# DeepSpeed config (2 ranks)\n")
    recipe = yaml.safe_load(head)
    assert (recipe["train"]["max_steps"], recipe["seed"], recipe["train"]["grad_accum"]) == (7, 5, 3)
    assert recipe["model"]["d_model"] == 64 and recipe["model"]["family"] == "gpt"  # resolved from the preset
    ds = json.loads(ds)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
    assert not (tmp_path / "run").exists()  # nothing written


def test_blend_recipe_reads_both_directories_by_weight(corpus):
    from llm.data import Blend, PackedTokens
    from llm.tasks import get_task

    blend = [{"path": str(corpus / "text" / "train"), "weight": 3}, {"path": str(corpus / "code" / "train")}]
    recipe = resolve_recipe(shard_recipe(corpus, train=blend))
    check_recipe(recipe)
    batches = get_task("causal_lm").batches(recipe.model, recipe.data, "train", 1, 4, 0, 1)
    stream = batches.loader.dataset
    assert isinstance(stream, Blend) and [d.path for d in stream.datasets] == [corpus / "text" / "train",
                                                                                corpus / "code" / "train"]  # fmt: skip
    assert stream.counts.tolist() == [768, 256]

    def vocabulary(name):
        stream = PackedTokens(corpus / name / "train", 16)
        return set(np.concatenate([stream.sample_at(i).numpy() for i in range(stream.num_samples)]).tolist())

    text_ids, code_ids = vocabulary("text"), vocabulary("code")
    windows = np.concatenate([batches.next_batch()["input_ids"].numpy() for _ in range(64)])  # 256 windows
    from_text = [set(w.tolist()) <= text_ids for w in windows]
    from_code = [set(w.tolist()) <= code_ids for w in windows]
    assert all(t != c for t, c in zip(from_text, from_code))  # each window comes from exactly one directory
    assert np.mean(from_text) == pytest.approx(0.75, abs=0.08)  # weights 3 : 1


def test_resume_that_changes_a_fixed_field_names_it(tmp_path, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", dict(TINY, run_dir=str(tmp_path / "run")))
    run(path, 1, "train.max_steps=2")
    base = resolve_recipe(dict(TINY, run_dir=str(tmp_path / "run")))
    assert check_resume(base, "auto").name == "step_00000002"
    assert check_resume(base, "none") is None
    for override, message in (
        ({"model": dict(TINY["model"], n_layers=3)}, r"^model.n_layers: is 3 but the checkpoint .*step_00000002 was "
                                                     r"trained with 2; this field cannot change on resume"),
        ({"data": dict(TINY["data"], seq_len=32)}, r"^data.seq_len: is 32 but .* was trained with 16"),
    ):  # fmt: skip
        changed = resolve_recipe(dict(TINY, run_dir=str(tmp_path / "run"), **override))
        with pytest.raises(ConfigError, match=message):
            check_resume(changed, "auto")
    # fields that may change (the optimizer's lr, max_steps) pass; the global batch must stay for the launcher's ranks
    check_resume(resolve_recipe(dict(TINY, run_dir=str(tmp_path / "run"), optim={"lr": 1e-4})), "auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^train.grad_accum: global batch 8 .* x 2 data-parallel ranks\) differs "
                                          r"from the checkpoint's 4 \(1 data-parallel ranks\)"):  # fmt: skip
        check_resume(base, "auto")
    # the CLI fails with that line before any process group starts
    path = write_recipe(tmp_path / "r3.yaml", dict(TINY, run_dir=str(tmp_path / "run"),
                                                    model=dict(TINY["model"], n_layers=3)))  # fmt: skip
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["pretrain", str(path), "--dry-run"]) == 2


def test_fine_tuning_files_models_and_teacher_are_checked_before_any_process_group(corpus, tmp_path):
    rows = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in (("the cat", "a"), ("def f", "b")) * 4)
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "other.jsonl").write_text(rows.replace('"b"', '"c"'))
    recipe = shard_recipe(corpus, train=str(tmp_path / "train.jsonl"))
    recipe["task"] = "text_classification"
    assert check(recipe).options.labels == ["a", "b"]  # an example file where shards would be, labels from it
    with pytest.raises(ConfigError, match=r"^data.train: .*gone.jsonl: no such file or directory"):
        check(dict(recipe, data=dict(recipe["data"], train=str(tmp_path / "gone.jsonl"))))
    with pytest.raises(ConfigError, match=r"^data.tokenizer: needed to tokenize .*train.jsonl"):
        check(dict(recipe, data=dict(recipe["data"], tokenizer=None)))
    blend = [{"path": str(tmp_path / "train.jsonl")}, {"path": str(tmp_path / "other.jsonl")}]
    with pytest.raises(ConfigError, match=r"^data.train\[1\].path: .*other.jsonl: labels \['a', 'c'\] differ"):
        check(dict(recipe, data=dict(recipe["data"], train=blend)))
    with pytest.raises(ConfigError, match=r"^init_from: .*nowhere: not found"):
        check(dict(recipe, init_from=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^distill.teacher: .*empty"):
        check(dict(shard_recipe(corpus), distill={"teacher": str(tmp_path / "empty")}))


# Each plug-in section with a misspelt and an out-of-range setting: (recipe fields, the path named, the message).
PLUGIN_ERRORS = {
    "task_misspelt": ({"task": {"name": "text_classification", "num_label": 3}}, "task.num_label", "unknown key"),
    "task_range": ({"task": {"name": "text_classification", "num_labels": 1}}, "task.num_labels", "must be >= 2"),
    "lora_misspelt": ({"adapt": {"method": "lora", "rnak": 16}}, "adapt.rnak", "unknown key"),
    "lora_range": ({"adapt": {"method": "lora", "rank": 0}}, "adapt.rank", "must be >= 1, got 0"),
    "prefix_misspelt": ({"adapt": {"method": "prefix", "num_virtual_token": 4}}, "adapt.num_virtual_token", "unknown"),
    "prefix_range": ({"adapt": {"method": "prefix", "num_virtual_tokens": 0}}, "adapt.num_virtual_tokens", ">= 1"),
    "prompt_misspelt": ({"adapt": {"method": "prompt", "num_virtual_tokens": 4, "init_idz": [1]}}, "adapt.init_idz",
                        "unknown key"),
    "prompt_range": ({"adapt": {"method": "prompt", "num_virtual_tokens": -2}}, "adapt.num_virtual_tokens", ">= 1"),
    "freeze_misspelt": ({"adapt": {"method": "freeze", "layer": ["trunk"]}}, "adapt.layer", "unknown key"),
    "freeze_range": ({"adapt": {"method": "freeze", "layers": []}}, "adapt.layers", "names nothing to freeze"),
    "full_setting": ({"adapt": {"method": "full", "rank": 8}}, "adapt.rank", "unknown key"),
    "adapt_method": ({"adapt": {"method": "dora"}}, "adapt.method", "expected one of 'full', 'freeze', 'lora'"),
    "lora_in_transforms": ({"transforms": [{"name": "lora", "alpha": 0}]}, "transforms[0].alpha", "must be > 0"),
    "quantize_misspelt": ({"transforms": [{"name": "quantize", "methd": "int8"}]}, "transforms[0].methd", "unknown"),
    "quantize_range": ({"transforms": [{"name": "quantize", "group_size": 3}]}, "transforms[0].group_size",
                       "positive even number"),
    "prune_transform_misspelt": ({"transforms": [{"name": "prune", "head": [1, 1]}]}, "transforms[0].head",
                                 "unknown key"),
    "prune_transform_range": ({"transforms": [{"name": "prune", "heads": [0, 1]}]}, "transforms[0].heads",
                              "at least one unit"),
    "transform_name": ({"transforms": [{"name": "dropout"}]}, "transforms[0].name", "expected one of 'freeze'"),
    "prune_misspelt": ({"prune": {"sparsty": 0.5}}, "prune.sparsty", "unknown key"),
    "prune_range": ({"prune": {"sparsity": 1.5}}, "prune.sparsity", "must be in [0, 1), got 1.5"),
    "distill_misspelt": ({"distill": {"temprature": 2.0}}, "distill.temprature", "unknown key"),
    "distill_range": ({"distill": {"temperature": 0}}, "distill.temperature", "must be > 0"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PLUGIN_ERRORS))
def test_dry_run_refuses_a_bad_plugin_setting_naming_the_users_path(name, tmp_path, capsys, monkeypatch):
    """Every plug-in section is typed when the recipe loads: one line naming the field as the recipe
    spells it, and no process group started (init_distributed would fail the test)."""
    import llm.train.distributed

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(llm.train.distributed, "init_distributed", no_process_group)
    fields, path, message = PLUGIN_ERRORS[name]
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, **fields, "run_dir": str(tmp_path / "run")})
    assert main(["pretrain", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"llm: error: {path}: "), err
    assert message in err[0], err[0]


def test_plugin_settings_are_typed_and_the_recorded_recipe_loads_again():
    """task, adapt and transforms become their registries' settings classes; dataclasses.asdict (what
    RUN_DIR/recipe.yaml records) writes them as the recipe wrote them, defaults filled, and loads again."""
    from llm.adapt.lora import LoRASettings
    from llm.compress.quantize import QuantizeSettings
    from llm.run.recipe import recipe_transforms
    from llm.tasks.text_classification import TextClassificationOptions

    data = {**TINY, "task": {"name": "text_classification", "num_labels": 3}, "adapt": {"method": "lora", "rank": 4},
            "transforms": [{"name": "quantize", "method": "int4"}]}  # fmt: skip
    recipe = resolve_recipe(data)
    assert isinstance(recipe.task, TextClassificationOptions) and recipe.task.num_labels == 3
    assert isinstance(recipe.adapt, LoRASettings) and (recipe.adapt.rank, recipe.adapt.alpha) == (4, 16.0)
    assert isinstance(recipe.transforms[0], QuantizeSettings) and recipe.transforms[0].group_size == 32
    recorded = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(recipe)))
    assert recorded["adapt"] == {"method": "lora", "rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["q", "v"],
                                 "trainable": []}  # fmt: skip
    assert recorded["task"] == {"name": "text_classification", "num_labels": 3, "labels": None, "pooling": None}
    assert resolve_recipe(recorded) == recipe
    # the model records each transform as the recipe gave it; adapt's method comes last, by name
    assert recipe_transforms(recipe) == [{"name": "quantize", "method": "int4"}, {"name": "lora", "rank": 4}]


def test_a_recipe_recorded_without_its_defaults_resumes_unchanged():
    """A checkpoint's recipe.yaml written before every default was recorded (adapt: {method: lora,
    rank: 4} only) compares equal to the same recipe loaded now: the resume check sees settings,
    not spellings; a setting that really changed is still named."""
    from llm.train import recipe_change

    data = {**TINY, "adapt": {"method": "lora", "rank": 4}}
    recipe = resolve_recipe(data)
    current = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(recipe)))
    old_form = yaml.safe_load(yaml.safe_dump(data))
    assert recipe_change.changes(old_form, current)  # the raw forms differ (alpha, dropout, targets...)
    assert recipe_change.changes(recipe.as_recorded(old_form), current) == {}
    changed = {**data, "adapt": {"method": "lora", "rank": 8}}
    assert set(recipe_change.changes(recipe.as_recorded(changed), current)) == {"adapt.rank"}
