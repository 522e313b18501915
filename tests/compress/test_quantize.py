"""Quantization: every Linear (and the tied head/embedding) quantized by torchao, saved as plain
safetensors (int4 packed two per byte), rebuilt by the loader with bit-identical outputs."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from llm import transforms
from llm.compress import quantize
from llm.config import ConfigError
from llm.run.loader import load_model, save_pretrained
from tests.conftest import build, rel_err

warnings.filterwarnings("ignore")
SMALL = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=200, max_seq_len=32)


def quantized(model, method, group_size=32):
    return transforms.apply_transform(model, {"name": "quantize", "method": method, "group_size": group_size})


@pytest.mark.parametrize("method", quantize.METHODS)
@pytest.mark.parametrize("spec", [dict(), dict(tie_embeddings=False, n_kv_heads=2, mlp="swiglu", bias=False)])
def test_save_reload_is_bit_identical(tmp_path, method, spec):
    model = quantized(build({**SMALL, **spec}).eval(), method)
    ids = torch.randint(0, 200, (2, 11))
    before = model(ids).logits
    save_pretrained(model, tmp_path)
    assert all(not quantize.is_quantized(t) for t in load_file(str(tmp_path / "model.safetensors")).values())
    reloaded = load_model(tmp_path).eval()
    assert reloaded.transforms == [{"name": "quantize", "method": method, "group_size": 32}]
    assert torch.equal(reloaded(ids).logits, before)


@pytest.mark.parametrize("method", quantize.METHODS)
def test_every_linear_and_the_tied_table_are_quantized_once(method):
    model = quantized(build(SMALL), method)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding) or name == "lm_head":
            assert quantize.is_quantized(m.weight), name
    assert model.lm_head.weight is model.transformer.tok_embed.weight
    stored = transforms.plain_state(model)  # tied aliases left out
    assert [n for n in stored if n.endswith(".qdata") and ("tok_embed" in n or "lm_head" in n)] == [
        "transformer.tok_embed.weight.qdata"
    ]


@pytest.mark.parametrize("method,tol", [("int8", 1e-2), ("int4", 0.15)])
def test_stored_parts_are_what_the_layer_computes(method, tol):
    """Dequantizing the saved plain tensors by hand (float64: (q - zero_point) * scale per group) gives
    the weight the quantized layer multiplies by, and that weight is close to the original."""
    model = build(SMALL).eval()
    original = model.transformer.blocks[0].mlp.fc_in.weight.detach().double().clone()
    quantized(model, method)
    layer = model.transformer.blocks[0].mlp.fc_in
    parts = transforms.plain_state(model)
    q = parts["transformer.blocks.0.mlp.fc_in.weight.qdata"]
    if method == "int4":
        assert q.dtype == torch.uint8 and q.shape[1] == original.shape[1] // 2
        q = quantize.unpack_int4(q)
    scale = parts["transformer.blocks.0.mlp.fc_in.weight.scale"].double()
    zero = parts["transformer.blocks.0.mlp.fc_in.weight.zero_point"].double()
    group = original.shape[1] // scale.shape[1]
    w = (q.double() - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)
    x = torch.randn(5, original.shape[1], dtype=torch.float64)
    ref = x @ w.T + layer.bias.detach().double()
    assert rel_err(layer(x.float()), ref) < 1e-5
    assert rel_err(w, original) < tol


def test_int4_packing_round_trips_every_value():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, torch.randperm(32)]
    packed = quantize.pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(quantize.unpack_int4(packed), values)


def test_int8_and_int4_files_are_smaller(tmp_path):
    spec = dict(n_layers=2, d_model=128, n_heads=4, d_ff=512, vocab_size=1024, max_seq_len=64)
    sizes = {}
    for method in (None, "int8", "int4"):
        model = build(spec)
        if method:
            quantized(model, method)
        sizes[method] = (save_pretrained(model, tmp_path / str(method)) / "model.safetensors").stat().st_size
    assert sizes[None] / sizes["int8"] >= 3.5
    assert sizes[None] / sizes["int4"] >= 6


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="group_size"):
        quantized(build(SMALL), "int4", group_size=48)
    with pytest.raises(ConfigError, match="method"):
        quantized(build(SMALL), "int3")
    with pytest.raises(ConfigError, match="already quantized"):
        quantized(quantized(build(SMALL), "int8"), "int8")
