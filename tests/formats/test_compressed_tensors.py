"""Quantized models exported as compressed-tensors: transformers loads `llm convert --to hf` of int8
and int4 GPT-2, LLaMA-style and BERT models, and its logits equal llm's quantized model's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llm import transforms
from llm.run.convert import write_format
from llm.run.loader import load_model
from tests.conftest import build, rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

GPT = dict(family="gpt", vocab_size=96, max_seq_len=40, d_model=64, n_layers=2, n_heads=4, d_ff=128)
GPT.update(mlp="gelu_tanh", dropout=0.0, attention_dropout=0.0)
LLAMA = dict(GPT, family="llama", n_kv_heads=2, norm="rmsnorm", position="rotary", mlp="swiglu", bias=False)
LLAMA.update(tie_embeddings=False)
BERT = dict(GPT, family="bert", causal=False, norm_position="post", type_vocab_size=2, pooler=True, mlp="gelu")
MODELS = {"gpt": (GPT, "causal_lm", "GPT2LMHeadModel"), "llama": (LLAMA, "causal_lm", "LlamaForCausalLM")}
MODELS["bert"] = (BERT, "text_classification", "BertForSequenceClassification")


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("family", list(MODELS))
def test_transformers_loads_the_compressed_export_with_llm_logits(family, method, tmp_path):
    spec, task, arch = MODELS[family]
    model = build(spec, task=task, **({"num_labels": 3} if task == "text_classification" else {}))
    quantized = transforms.apply_transforms(model, [{"name": "quantize", "method": method}]).eval()
    write_format(quantized, tmp_path / "out", "hf")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["architectures"] == [arch] and qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == int(method[3:]) and weights["symmetric"] and weights["type"] == "int"
    hf = transformers.AutoModelForSequenceClassification if task == "text_classification" else None
    hf = (hf or transformers.AutoModelForCausalLM).from_pretrained(tmp_path / "out").eval()
    # every projection transformers builds as a Linear or Conv1D, the LM head aside, is stored packed
    projections = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    expected = {n for n, m in hf.named_modules() if isinstance(m, projections) and n != "lm_head"}
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    packed = {k.removesuffix(".weight_packed") for k, v in tensors.items() if k.endswith(".weight_packed")}
    assert packed == expected and all(tensors[f"{n}.weight_packed"].dtype == torch.int32 for n in packed)
    assert not any(f"{n}.weight" in tensors for n in packed)
    x = torch.randint(1, 96, (3, 17))
    reread = load_model(tmp_path / "out").eval()  # llm reads it back, dequantized
    with torch.no_grad():
        assert rel_err(hf(x).logits, quantized(x).logits) < 1e-5
        assert rel_err(reread(x).logits, quantized(x).logits) < 1e-5
