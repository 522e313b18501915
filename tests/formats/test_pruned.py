"""Structurally pruned models in Hugging Face's format: where every block keeps the same widths,
transformers loads `--to hf` with llm's logits; otherwise the check says why in one line."""

from __future__ import annotations

import pytest
import torch

from llm import transforms
from llm.compress.prune import prune_structured
from llm.run.convert import write_format
from llm.run.formats import hf as hf_format
from tests.conftest import build, rel_err
from tests.formats.test_compressed_tensors import BERT, GPT, LLAMA

transformers = pytest.importorskip("transformers")

CASES = {
    "gpt": (GPT, "causal_lm", transformers.AutoModelForCausalLM, []),
    "llama": (LLAMA, "causal_lm", transformers.AutoModelForCausalLM, []),
    "llama-int8": (LLAMA, "causal_lm", transformers.AutoModelForCausalLM, [{"name": "quantize", "method": "int8"}]),
    "bert": (BERT, "text_classification", transformers.AutoModelForSequenceClassification, []),
}


def trained_like(model):
    """Weights of uneven norms, so that the pruned neurons are not the first ones."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) * 2)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_a_uniformly_pruned_model_with_llm_logits(case, tmp_path):
    spec, task, auto, then = CASES[case]
    model = prune_structured(trained_like(build(spec, task=task)), neurons=48)
    model = transforms.apply_transforms(model, then).eval() if then else model.eval()
    assert hf_format.check(model) is None
    write_format(model, tmp_path / "out", "hf")
    hf = auto.from_pretrained(tmp_path / "out").eval()
    width = hf.config.n_inner if spec is GPT else hf.config.intermediate_size
    assert width == spec["d_ff"] - 48
    x = torch.randint(1, 96, (2, 13))
    with torch.no_grad():
        assert rel_err(hf(x).logits, model(x).logits) < 1e-5


def test_shapes_transformers_cannot_configure_are_refused_in_one_line():
    uneven = transforms.apply_transforms(build(LLAMA), [{"name": "prune", "heads": [2, 2], "neurons": [100, 64]}])
    assert "different MLP widths [100, 64]" in hf_format.check(uneven)
    fewer_heads = prune_structured(build(LLAMA), heads=1)
    assert "keep [1, 1] of 2 attention head groups" in hf_format.check(fewer_heads)
