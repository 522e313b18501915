"""`init_from` a model an earlier run adapted: what it trained carries into the new run (an adapter
continued, or LoRA merged first), or the run stops with one line naming what would be lost.

The reference is the earlier model itself: its logits on fixed ids before it was saved (or those
transformers computes from its Hugging Face export) against the logits of the model the new run
starts with (built as `llm finetune` builds it, before any step), and its adapter tensors."""

from __future__ import annotations

import pytest
import torch

from llm.adapt import apply_transforms, lora
from llm.config import ConfigError
from llm.run.export import export_artifacts
from llm.run.loader import save_pretrained
from tests.conftest import build, rel_err

GPT = dict(family="gpt", vocab_size=97, max_seq_len=40, d_model=32, n_layers=2, n_heads=4, d_ff=64)
GPT.update(norm="layernorm", position="learned", mlp="gelu_tanh", bias=True, tie_embeddings=True, causal=True)
GPT.update(dropout=0.0, attention_dropout=0.0)
LORA = {"name": "lora", "rank": 4, "alpha": 8, "targets": ["q", "v", "fc_out"]}
VIRTUAL = {"prefix": {"name": "prefix", "num_virtual_tokens": 3}, "prompt": {"name": "prompt", "num_virtual_tokens": 3}}
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def trained(records: list[dict]):
    """A GPT with `records` applied and every adapter tensor moved off its start (B of LoRA is zero there)."""
    model = apply_transforms(build(GPT), records)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or name.startswith(("transformer.prefix.", "transformer.prompt.")):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def start(init_from, adapt: dict | None):
    """The model a fine-tuning run from `init_from` with `adapt` trains from, before its first step."""
    from llm.run.recipe import finetune_recipe
    from llm.run.train import build_model, check_recipe

    data = {"init_from": str(init_from), "data": {"source": "synthetic", "seq_len": 8}}
    recipe = finetune_recipe({**data, "adapt": adapt} if adapt else data)
    return build_model(recipe, check_recipe(recipe))


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n or ".prefix." in n or ".prompt." in n}


def test_a_lora_model_continues_its_adapter(tmp_path, caplog):
    """adapt: lora with the model's rank, alpha and targets (dropout and trainable may differ) continues
    the trained A and B: the run starts with the earlier model's logits, and only the adapters train."""
    earlier = trained([LORA])
    save_pretrained(earlier, tmp_path / "model")
    method = {k: v for k, v in LORA.items() if k != "name"}
    model = start(tmp_path / "model", {"method": "lora", **method, "dropout": 0.1})
    assert rel_err(logits(model), logits(earlier)) < 1e-6
    ours, theirs = adapter_tensors(model), adapter_tensors(earlier)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ours)
    assert [t["name"] for t in model.transforms] == ["lora"]
    assert "adapt continues the lora the model was trained with" in caplog.text
    assert f"loaded {len(earlier.state_dict())} tensors; freshly initialised: none" in caplog.text


@pytest.mark.parametrize(
    "adapt",
    [{"method": "full"}, {"method": "lora", "rank": 2}, {"method": "freeze", "layers": ["blocks.0"]}, None],
    ids=["full", "lora-rank-2", "freeze", "no-adapt"],
)
def test_lora_the_recipe_does_not_continue_is_merged_first(adapt, tmp_path, caplog):
    """Any other method (or none) starts from the model with its LoRA merged into the weights (as PEFT's
    merge_and_unload): the same logits, no trace of the old adapter, the recipe's method on top."""
    earlier = trained([LORA])
    save_pretrained(earlier, tmp_path / "model")
    model = start(tmp_path / "model", adapt)
    assert rel_err(logits(model), logits(earlier)) < 1e-5
    assert "is merged into the weights" in caplog.text
    names = [t["name"] for t in model.transforms]
    assert names == ([] if adapt is None or adapt["method"] == "full" else [adapt["method"]])
    if adapt is None or adapt["method"] == "full":
        assert all(p.requires_grad for p in model.parameters())
    if names == ["lora"]:  # a fresh adapter of the new rank on the merged weights
        assert all(layer.lora_rank == 2 for _, layer in lora.adapted_layers(model))


def test_lora_merged_before_a_prefix_gives_the_merged_weights_by_the_lora_formula(tmp_path):
    """W + (alpha / rank) B @ A per adapted slice, computed here in float64 from the earlier model's tensors."""
    earlier = trained([LORA])
    save_pretrained(earlier, tmp_path / "model")
    model = start(tmp_path / "model", {"method": "prefix", "num_virtual_tokens": 2})
    for name, layer in lora.adapted_layers(earlier):
        expected = layer.weight.detach().double().clone()
        for _, (lo, hi), a, b in layer.lora_pairs():
            expected[lo:hi] += (LORA["alpha"] / LORA["rank"]) * (b.double() @ a.double())
        assert rel_err(model.get_submodule(name).weight, expected) < 1e-6, name


@pytest.mark.parametrize("method", list(VIRTUAL))
@pytest.mark.parametrize("saved", ["llm", "hf-export"])
def test_virtual_tokens_continue_or_the_run_is_refused(method, saved, tmp_path):
    """A prefix or soft prompt (from an llm model directory, or a Hugging Face export with adapter/ beside)
    continues under the same settings; any other method would drop it (it cannot be merged): one error."""
    earlier = trained([VIRTUAL[method]])
    if saved == "llm":
        save_pretrained(earlier, tmp_path / "model")
    else:
        assert export_artifacts(earlier, tmp_path / "model")["adapter"]
    model = start(tmp_path / "model", {"method": method, "num_virtual_tokens": 3})
    assert rel_err(logits(model), logits(earlier)) < 1e-6
    ours, theirs = adapter_tensors(model), adapter_tensors(earlier)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    for other in ({"method": "lora"}, {"method": "full"}, {"method": method, "num_virtual_tokens": 2}):
        with pytest.raises(ConfigError, match=rf"^init_from: .*carries a {method} .*would be lost"):
            start(tmp_path / "model", other)


def test_a_hugging_face_export_of_a_lora_run_starts_from_its_merged_weights(tmp_path, caplog):
    """The export holds LoRA merged (adapter/ is PEFT's copy for other tools): the run starts from those
    weights, with the recipe's adapter fresh on top, and says how to continue the adapter itself."""
    earlier = trained([LORA])
    export_artifacts(earlier, tmp_path / "export")
    model = start(tmp_path / "export", {"method": "lora", **{k: v for k, v in LORA.items() if k != "name"}})
    assert rel_err(logits(model), logits(earlier)) < 1e-5
    assert all(torch.count_nonzero(b) == 0 for n, b in model.named_parameters() if ".lora_B" in n)
    assert "LoRA adapter (adapter/) is merged into its weights" in caplog.text


def test_a_quantized_model_is_refused_naming_why(tmp_path):
    from llm import transforms

    save_pretrained(transforms.apply_transforms(build(GPT), [{"name": "quantize", "method": "int8"}]), tmp_path / "q")
    with pytest.raises(ConfigError, match=r"^init_from: .*a quantized model \(method: int8\) cannot be trained"):
        start(tmp_path / "q", {"method": "lora"})


@pytest.mark.distributed
def test_a_finetune_from_a_zero3_lora_run_continues_its_adapter(tmp_path):
    """The reported case: `llm finetune` from the run directory of a LoRA run trained with ZeRO-3 on 2
    ranks, adapt: the same LoRA, one step at lr 1e-12: its export gives (in transformers) the logits of
    the earlier run's export, and the log counts the adapter tensors as loaded."""
    import subprocess

    import yaml

    from tests.train.helpers import PYTHON, ROOT, TINY, env, run, write_recipe

    transformers = pytest.importorskip("transformers")
    method = {k: v for k, v in LORA.items() if k != "name"}
    first = write_recipe(tmp_path / "lora.yaml", {**TINY, "transforms": [LORA], "optim": {"lr": 3e-2}})
    run(first, 2, f"run_dir={tmp_path / 'first'}", "deepspeed.zero_stage=3", "train.max_steps=3", resume="none")
    second = {
        "init_from": str(tmp_path / "first"),
        "adapt": {"method": "lora", **method},
        "data": TINY["data"],
        "run_dir": str(tmp_path / "second"),
        "train": {"max_steps": 1, "micro_batch_size": 2},
        "optim": {"lr": 1e-12},
        "logging": {"tensorboard": False, "progress": False},
    }
    (tmp_path / "second.yaml").write_text(yaml.safe_dump(second))
    command = [PYTHON, "-m", "llm", "finetune", str(tmp_path / "second.yaml")]
    proc = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapt continues the lora the model was trained with" in proc.stderr
    assert "freshly initialised: none" in proc.stderr
    ids = torch.randint(0, 256, (2, 12))
    out = {}
    for name in ("first", "second"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name / "export").eval()
        with torch.no_grad():
            out[name] = hf(ids).logits
    assert rel_err(out["second"], out["first"]) < 1e-5
