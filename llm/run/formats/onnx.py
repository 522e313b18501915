"""`--to onnx`: the model's forward as one ONNX graph (model.onnx) that ONNX Runtime runs.

Inputs: `input_ids` and `attention_mask` (int64, batch x sequence, both axes dynamic; `token_type_ids`
too where the model has segment embeddings), or `pixel_values` (float32, batch x channels x height x
width, the batch dynamic) for an image model. Outputs: the tensors of llm's `ModelOutput` that the
forward returns without labels, by their names (`logits`, `nsp_logits`, `pooled`, `hidden_states`).
The graph always applies the attention mask (llm skips a mask of ones; the result is the same).

Exported with torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, which needs
onnxscript): on torch 2.13 the TorchScript exporter fails on the trunk (it traces SDPA's `enable_gqa`
as a tensor), and the dynamo exporter is torch's supported path. `int8` then quantizes every MatMul
weight to int8 with ONNX Runtime's dynamic quantization (`onnxruntime.quantization.quantize_dynamic`
after its recommended `quant_pre_process`: one weight scale per output channel, which kept the MiniLM
sentiment classifier 0.35 points closer to fp32 than one per tensor at the same speed; activations
quantized per batch at run time); model.onnx is then the int8 graph. The tokenizer's files go beside
the graph, and the task, its labels and the input names into the graph's metadata.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from llm.models.base import Model
from llm.run.formats import require

FILE = "model.onnx"
OPSET = 20  # torch 2.13's default, pinned; ONNX Runtime runs it from 1.17 on
OUTPUTS = ("logits", "nsp_logits", "pooled", "hidden_states")  # ModelOutput fields, in this order
PROTOBUF_LIMIT = 2**31  # bytes; larger weights go to an external data file beside the graph


def check(model: Model) -> str | None:
    """Why the exported graph cannot compute what llm's forward does, else None."""
    if model.task == "contrastive":
        return "a contrastive model's forward scores pairs within its batch (sentence-transformers holds its encoder)"
    for t in model.transforms:
        if t["name"] == "quantize":
            return "ONNX holds the unquantized model: convert that one with --int8 (ONNX Runtime's int8)"
    return None


class Forward(nn.Module):
    """`model`'s forward on positional inputs named `inputs`, returning the output fields `outputs` as a tuple."""

    def __init__(self, model: Model, inputs: tuple[str, ...], outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.inputs, tensors)))
        return tuple(getattr(out, name) for name in self.outputs)


def example_inputs(model: Model, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Inputs of the graph, by name, for a batch of `batch` (of `seq` tokens; the last one padded by one);
    the same values on every call, so that an export is reproducible."""
    cfg, g = model.config, torch.Generator().manual_seed(0)
    if cfg.is_image:
        return {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}
    seq = min(seq, cfg.max_seq_len)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, -1] = 0
    inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g), "attention_mask": mask}
    if cfg.type_vocab_size:
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
    return inputs


def write(model: Model, out_dir: Path, tokenizer: Path | None = None, *, int8: bool = False) -> None:
    """`int8`: quantize the weights of the graph's matrix products to int8 (ONNX Runtime's dynamic quantization).
    Puts `model` in eval mode."""
    require("onnxscript")
    onnx = require("onnx")
    if int8:
        require("onnxruntime")
    out_dir, large = Path(out_dir), sum(p.numel() * p.element_size() for p in model.parameters()) >= PROTOBUF_LIMIT
    path = out_dir / FILE
    exported = out_dir / "fp32" / FILE if int8 else path
    inputs = export(model.eval(), exported, large)
    if int8:
        quantize_int8(exported, path, large)
    graph = onnx.load(str(path), load_external_data=False)
    metadata = {"llm.task": model.task, "llm.inputs": json.dumps(list(inputs)), "llm.int8": json.dumps(int8)}
    if getattr(model.options, "labels", None):
        metadata["llm.labels"] = json.dumps(list(model.options.labels))
    onnx.helper.set_model_props(graph, metadata)
    onnx.save(graph, str(path))
    if tokenizer is not None:
        from llm.data.tokenizer import Tokenizer

        Tokenizer(tokenizer).save_hf(out_dir, None if model.config.is_image else model.config.max_seq_len)


def export(model: Model, path: Path, large: bool) -> dict[str, torch.Tensor]:
    """Export the forward of `model` (in eval mode) to `path` (weights in `path`.data where `large`); returns the
    example inputs by name. The exporter's notes about torchvision and its own deprecations are kept quiet."""
    inputs = example_inputs(model)
    with torch.no_grad():
        out = model(**inputs)
    outputs = tuple(name for name in OUTPUTS if getattr(out, name) is not None)
    batch = torch.export.Dim("batch")
    axes = {"pixel_values": {0: batch}}
    if not model.config.is_image:
        seq = torch.export.Dim("sequence", max=model.config.max_seq_len)
        axes = {name: {0: batch, 1: seq} for name in inputs}
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name")
            program = torch.onnx.export(
                Forward(model, tuple(inputs), outputs).eval(),
                tuple(inputs.values()),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_shapes=(tuple(axes[name] for name in inputs),),  # one entry: Forward.forward's *tensors
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    finally:
        log.setLevel(level)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=large)
    return inputs


def quantize_int8(exported: Path, path: Path, large: bool) -> None:
    """ONNX Runtime's dynamic int8 quantization of the graph at `exported` into `path`, after its recommended
    pre-processing (shape inference, graph optimization); the folder of `exported` is removed afterwards."""
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = exported.with_name("prepared.onnx")
    quant_pre_process(exported, prepared, save_as_external_data=large)
    quantize_dynamic(prepared, path, per_channel=True, use_external_data_format=large)
    shutil.rmtree(exported.parent)
