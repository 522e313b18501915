"""Quantized models inside `--to hf`: compressed-tensors checkpoints, the format llm-compressor writes
and transformers and vLLM read (config.json's `quantization_config`, quant_method "compressed-tensors").

llm's weight-only methods map exactly, as format "pack-quantized" (integers packed into int32 by the
package's own `pack_to_int32`; `weight_packed`, `weight_scale`, `weight_shape` per layer; symmetric,
so no zero point):
- int8: one scale per output channel -> 8 bits, strategy "channel";
- int4: one scale per group of `group_size` input columns -> 4 bits, strategy "group".
Scales are stored as float32 (int4's fp16 scales upcast exactly), so the runtime's dequantized weights
q * s equal llm's in float32. The embeddings and the LM head, which llm quantizes too, are written as
their dequantized values: compressed-tensors runtimes quantize Linear layers (`ignore: [lm_head]`).

GPT-2's projections are Conv1D layers in transformers, stored transposed (in, out), so their scales
run along the stored columns; only strategy "block" says that: blocks of [rows, 1], one scale per
column of each block (rows = `group_size` for int4; for int8 the common divisor of the layers' input
widths, the channel's scale repeated down its column). transformers' compressed layers are Linear, so
the config asks it to dequantize them on load (`dequantize: true`).

int8-dynamic is not written: compressed-tensors runtimes quantize activations by their own rules,
which need not reproduce llm's outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llm import transforms
from llm.compress.quantize import QuantizeSettings, unpack_int4
from llm.compress.quantized import QuantizedLinear
from llm.config import build_config
from llm.models.base import Model
from llm.models.hf import to_theirs
from llm.run import loader
from llm.run.formats import require
from llm.tasks import task_of
from llm.tasks.hf import hf_rules

BITS = {"int8": 8, "int4": 4}


def settings(model: Model) -> QuantizeSettings | None:
    """The settings of `model`'s `quantize` transform, defaults filled in; None for a model not quantized."""
    record = next((t for t in model.transforms if t["name"] == "quantize"), None)
    if record is None:
        return None
    return build_config(QuantizeSettings, {k: v for k, v in record.items() if k != "name"}, "quantize")


def _layers(model: Model) -> tuple[str, list]:
    """(trunk prefix, the Hugging Face rules of the model's quantized Linear layers)."""
    prefix, rules = hf_rules(model.config, task_of(model))
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    return prefix, [r for r in rules if r.ours in linear]


def check(model: Model) -> str | None:
    """Why compressed-tensors cannot hold the quantized `model` exactly, else None."""
    method = settings(model).method
    if method not in BITS:
        return f"quantize method {method!r} has no exact compressed-tensors form (int8 and int4 have)"
    _, layers = _layers(model)
    if any(r.op == "conv1x1" for r in layers):
        return "its patch embedding is a Conv2d in transformers, which compressed-tensors does not quantize"
    if len({r.op == "t" for r in layers}) > 1:
        return "it mixes Linear and Conv1D layers in transformers, which one compressed-tensors scheme cannot hold"
    if any(v.any() for k, v in transforms.plain_state(model).items() if k.endswith(".zero_point")):
        return "its quantized weights have zero points; the symmetric compressed-tensors schemes have none"
    return None


def _integers(state: dict[str, torch.Tensor], name: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale float32 (out, groups)) of quantized weight `name` in plain tensors `state`."""
    q = state[f"{name}.qdata"]
    return (unpack_int4(q) if method == "int4" else q), state[f"{name}.scale"].float()


def float_model(model: Model) -> Model:
    """A copy of quantized `model` without the quantize transform, each weight its dequantized value q * s."""
    method = settings(model).method
    description = model.description()
    description["transforms"] = [t for t in description["transforms"] if t["name"] != "quantize"]
    state = transforms.plain_state(model)
    dense = {k: v for k, v in state.items() if not k.endswith((".qdata", ".scale", ".zero_point"))}
    for key in [k.removesuffix(".qdata") for k in state if k.endswith(".qdata")]:
        q, scale = _integers(state, key, method)
        dense[key] = q.float() * scale.repeat_interleave(q.shape[1] // scale.shape[1], dim=1)
    copy = loader.build_from_description(description, "the quantized model")
    return loader.load_weights(copy, dense, "the quantized model").eval()


def compressed(model: Model, dense: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(Hugging Face tensors, config.json's quantization_config) of quantized `model`: `dense` (the Hugging
    Face tensors of `float_model(model)`) with each quantized Linear layer's weight in its packed form.
    Raises UserError naming `pip install compressed-tensors` where the package is missing."""
    require("compressed_tensors", "compressed-tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    s, cfg, state = settings(model), model.config, transforms.plain_state(model)
    method, bits = s.method, BITS[s.method]
    prefix, layers = _layers(model)
    conv1d = bool(layers) and layers[0].op == "t"
    if conv1d:
        rows = s.group_size if method == "int4" else math.gcd(*(state[f"{r.ours}.qdata"].shape[1] for r in layers))
        weights = QuantizationArgs(num_bits=bits, strategy="block", block_structure=[rows, 1])
    elif method == "int4":
        weights = QuantizationArgs(num_bits=bits, strategy="group", group_size=s.group_size)
    else:
        weights = QuantizationArgs(num_bits=bits, strategy="channel")
    tensors = dict(dense)
    for rule in layers:
        q, scale = _integers(state, rule.ours, method)
        for theirs, q_part, s_part in zip(rule.theirs, to_theirs(rule, q, cfg), to_theirs(rule, scale, cfg)):
            module = (prefix if rule.base else "") + theirs.removesuffix(".weight")
            if conv1d:  # s_part (groups, out): one row per block of `rows` input rows
                s_part = s_part.repeat_interleave(q_part.shape[0] // rows // s_part.shape[0], dim=0)
            del tensors[f"{module}.weight"]
            tensors[f"{module}.weight_packed"] = pack_to_int32(q_part.contiguous(), bits)
            tensors[f"{module}.weight_scale"] = s_part.contiguous()
            tensors[f"{module}.weight_shape"] = torch.tensor(q_part.shape)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Conv1D" if conv1d else "Linear"], weights=weights)},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=[] if conv1d else ["lm_head"],
    ).model_dump(exclude_none=True)
    return tensors, {**config, "dequantize": True} if conv1d else config
