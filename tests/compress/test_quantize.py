"""Quantization: every Linear, the head and the embeddings (a tied table once) run on llm's modules and kernels,
save in the file layout torchao's tensors had (int4 packed two per byte), and reload with bit-identical outputs."""

import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm import kernels, transforms
from llm.compress import quantize
from llm.compress.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedLMHead, QuantizedWeight
from llm.config import ConfigError
from llm.errors import UserError
from llm.run.loader import load_model, save_pretrained
from tests.compress.test_gptq import torchao_config
from tests.conftest import build, rel_err

warnings.filterwarnings("ignore")
SMALL = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=200, max_seq_len=32)
LLAMA = dict(tie_embeddings=False, n_kv_heads=2, mlp="swiglu", bias=False)


def quantized(model, method, group_size=32):
    return transforms.apply_transform(model, {"name": "quantize", "method": method, "group_size": group_size})


@pytest.mark.parametrize("method", quantize.METHODS)
@pytest.mark.parametrize("spec", [dict(), LLAMA])
def test_save_reload_is_bit_identical(tmp_path, method, spec):
    model = quantized(build({**SMALL, **spec}).eval(), method)
    ids = torch.randint(0, 200, (2, 11))
    before = model(ids).logits
    save_pretrained(model, tmp_path)
    reloaded = load_model(tmp_path).eval()
    assert reloaded.transforms == [{"name": "quantize", "method": method, "group_size": 32}]
    assert torch.equal(reloaded(ids).logits, before)


@pytest.mark.parametrize("method", quantize.METHODS)
@pytest.mark.parametrize("spec", [dict(), LLAMA])
def test_the_file_is_what_torchao_wrote(method, spec):
    """The saved tensors equal, name for name, in dtype, shape and value, what the torchao-based transform stored
    (its tensors' qdata (int4 packed low nibble first), scale and zero_point; the tied table once)."""
    model = build({**SMALL, **spec}).eval()
    reference = build({**SMALL, **spec}).eval()
    reference.load_state_dict(model.state_dict())
    from torchao.quantization import quantize_

    linear_cfg, embed_cfg = torchao_config(method, 32), torchao_config("int4" if method == "int4" else "int8", 32)
    is_embedding = lambda m, _: isinstance(m, torch.nn.Embedding)  # noqa: E731
    quantize_(reference, linear_cfg, filter_fn=lambda m, _: isinstance(m, (torch.nn.Linear, type(reference.lm_head))))
    if spec.get("tie_embeddings", True):
        reference.transformer.tok_embed.weight = reference.lm_head.weight
    quantize_(reference, embed_cfg, filter_fn=lambda m, fqn: is_embedding(m, fqn) and not hasattr(m.weight, "qdata"))
    expected = {}
    for name, t in reference.named_parameters():
        if hasattr(t, "qdata"):
            qdata = quantize.pack_int4(t.qdata) if method == "int4" else t.qdata
            expected.update({f"{name}.qdata": qdata, f"{name}.scale": t.scale, f"{name}.zero_point": t.zero_point})
        else:
            expected[name] = t.detach()
    ours = transforms.plain_state(quantized(model, method))
    assert sorted(ours) == sorted(expected)
    for name, t in expected.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


@pytest.mark.parametrize("method", quantize.METHODS)
def test_every_linear_and_the_tied_table_are_quantized_once(method):
    model = build(SMALL)
    parameters = model.num_parameters()
    quantized(model, method)
    kinds = {QuantizedLinear, QuantizedLMHead, QuantizedEmbedding}
    assert not any(isinstance(m, torch.nn.Linear | torch.nn.Embedding) for m in model.modules())
    assert {type(m) for m in model.modules()} >= kinds
    assert model.lm_head.weight is model.transformer.tok_embed.weight
    assert model.num_parameters() == parameters and not any(p.requires_grad for p in model.parameters())
    stored = transforms.plain_state(model)  # tied aliases left out
    assert [n for n in stored if n.endswith(".qdata") and ("tok_embed" in n or "lm_head" in n)] == [
        "transformer.tok_embed.weight.qdata"
    ]


@pytest.mark.parametrize("method,tol", [("int8", 1e-2), ("int8-dynamic", 1e-2), ("int4", 0.15)])
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
    x = torch.randn(5, original.shape[1])
    x_seen = x.double()
    if method == "int8-dynamic":  # the layer sees x on its per-token int8 grid (kernels.quantize_per_token)
        xq, x_scale = kernels.quantize_per_token(x)
        x_seen = xq.double() * x_scale.double()
    ref = x_seen @ w.T + layer.bias.detach().double()
    assert rel_err(layer(x), ref) < 1e-5
    assert rel_err(w, original) < tol
    ids = torch.randint(0, 200, (3, 7))
    table = parts["transformer.tok_embed.weight.qdata"]
    table = quantize.unpack_int4(table) if method == "int4" else table
    table_scale = parts["transformer.tok_embed.weight.scale"].double().repeat_interleave(group, 1)
    assert torch.equal(model.transformer.tok_embed(ids).double(), (table.double() * table_scale)[ids].float().double())


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_layers_run_on_the_cpu_kernels(method, caplog):
    """A layer the kernels take runs on the cpu backend (its output is that backend's, bit for bit), silently."""
    model = quantized(build(SMALL).eval(), method)
    layer = model.transformer.blocks[1].attn.qkv
    x = torch.randn(3, 5, 64)
    w = layer.weight
    if method == "int4":
        expected = kernels.int4_linear(x, w.qweight, w.scale, 32, layer.bias, backend="cpu")
    else:
        expected = kernels.int8_linear(x, w.qweight, w.scale, layer.bias, backend="cpu")
    with caplog.at_level(logging.WARNING, logger="llm"):
        assert torch.equal(layer(x), expected)
    assert not caplog.records


def test_a_layer_the_kernels_cannot_take_runs_correctly_and_says_so_once(caplog):
    """int4 with group size 34 (not a multiple of the kernels' vector width): every layer runs on the torch path,
    equal to the float64 reference, with one warning per layer naming it, however often it is called."""
    model = quantized(build({**SMALL, "d_model": 68, "d_ff": 136}).eval(), "int4", group_size=34)
    ids = torch.randint(0, 200, (2, 9))
    with caplog.at_level(logging.WARNING, logger="llm"):
        model(ids)
        model(ids)
    named = [r.getMessage() for r in caplog.records if "runs on the slower torch path" in r.getMessage()]
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear | QuantizedLMHead)]
    assert sorted(m.split(" ")[0] for m in named) == sorted(layers)
    fc_in = model.transformer.blocks[0].mlp.fc_in
    w = kernels.dequantize_int4(fc_in.weight.qweight, fc_in.weight.scale, 34, torch.float64)
    x = torch.randn(4, 68, dtype=torch.float64)
    assert rel_err(fc_in(x.float()), x @ w.T + fc_in.bias.double()) < 1e-5


def test_a_cast_model_keeps_exact_scales():
    model = quantized(build(SMALL).eval(), "int4")
    scale = model.lm_head.weight.scale.clone()
    model.to(torch.bfloat16)
    assert torch.equal(model.lm_head.weight.scale, scale)
    ids = torch.randint(0, 200, (2, 5))
    assert model.transformer.tok_embed(ids).dtype == torch.bfloat16
    assert model(ids).logits.dtype == torch.bfloat16


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


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.pop("transformer.blocks.0.attn.qkv.weight.scale"), "qkv.weight.scale missing"),
        (
            lambda t: t.update({"transformer.blocks.0.attn.qkv.weight.qdata": torch.zeros(3, 2, dtype=torch.uint8)}),
            r"qkv.weight.qdata is torch.uint8 \(3, 2\), the int4 weight needs torch.uint8 \(192, 32\)",
        ),  # fmt: skip
        (lambda t: t["transformer.blocks.0.attn.qkv.weight.zero_point"].fill_(1), "qkv.weight.*nonzero"),
    ],
)
def test_a_damaged_file_is_one_error_naming_the_tensor(tmp_path, change, message):
    save_pretrained(quantized(build(SMALL), "int4"), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=f"model.safetensors: transformer.blocks.0.attn.{message}"):
        load_model(tmp_path)


def test_state_dict_round_trips_through_load_state_dict():
    """A quantized model's state dict (the file layout) loads into another quantized model of that shape."""
    model, other = quantized(build(SMALL).eval(), "int4"), quantized(build(SMALL).eval(), "int4")
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, 200, (2, 5))
    assert torch.equal(other(ids).logits, model(ids).logits)
    assert isinstance(other.lm_head.weight, QuantizedWeight)


def test_the_quantized_head_gives_the_loss_of_its_logits():
    """QuantizedLMHead: the mean cross-entropy of its own logits over labels != -100, as LMHead's fused loss."""
    model = quantized(build(SMALL).eval(), "int8")
    ids = torch.randint(0, 200, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits.double().flatten(0, 1)
    keep = labels.flatten() != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels.flatten()[keep])
    assert rel_err(out.loss.double(), expected) < 1e-6


def test_a_cpu_without_the_kernels_runs_every_layer_correctly_with_one_line(monkeypatch, caplog):
    """No kernel build for this CPU: one warning for the whole model (the dispatcher's), none per layer, and the
    outputs of the torch path."""
    from llm.kernels import cpu_quant_linear

    model = quantized(build(SMALL).eval(), "int4")
    ids = torch.randint(0, 200, (2, 9))
    expected = model(ids).logits
    fresh = quantized(build(SMALL).eval(), "int4")
    fresh.load_state_dict(model.state_dict())
    monkeypatch.setattr(cpu_quant_linear, "unavailable", lambda device, op: "this CPU lacks AVX2 (a test)")
    with caplog.at_level(logging.WARNING, logger="llm"):
        logits = fresh(ids).logits
        fresh(ids)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "this CPU lacks AVX2 (a test)" in lines[0] and "using torch" in lines[0]
    assert rel_err(logits, expected) < 1e-5
