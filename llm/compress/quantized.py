"""The modules a quantized model runs on: its Linear layers, head and embeddings, over llm's kernels.

A `QuantizedWeight` holds one (N, K) weight in the layout of `llm.kernels.int8_linear` / `int4_linear`
(llm/kernels/reference.py) and converts it, once, from and to the file's layout when the state dict is
loaded or saved. The layers around it replace `nn.Linear` (`QuantizedLinear`), the language-model head
(`QuantizedLMHead`) and `nn.Embedding` (`QuantizedEmbedding`); a head tied to the token embedding shares
one `QuantizedWeight` with it, so the table is stored and held once.

The file's layout (the state dict's: `W.qdata`, `W.scale`, `W.zero_point`, as torchao stored them):
- int8 and int8-dynamic: qdata int8 (N, K), scale fp32 (N, 1), zero_point int8 zeros (N, 1);
- int4: qdata uint8 (N, K/2), two's complement nibbles, column 2j in the low nibble of byte j; scale fp16
  (N, K/group_size); zero_point int8 zeros (N, K/group_size).
In memory: qweight int8 (N, K) / uint8 (N, K/2) with nibbles offset by 8 (the file's bytes XOR 0x88), scale fp32
(N,) / (N, K/group_size). The int8 file tensors are views of these; int4 costs one XOR and one cast per save.

A layer whose shape the fast kernel cannot take (an input width or group size that is not a multiple of its
vector width, `llm.kernels.dispatch.fallback_reason`) says so in one log line naming it, at its first call on a
device, and runs on the torch path (the whole weight dequantized per call: correct, slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm import kernels
from llm.kernels import dispatch
from llm.log import logger

PARTS = ("qdata", "scale", "zero_point")
OPS = {"int8": "int8_linear", "int8-dynamic": "int8_dynamic_linear", "int4": "int4_linear"}
NIBBLE_OFFSET = 0x88  # two's complement nibbles XOR 0x88 = the nibbles + 8, in both halves of a byte


class QuantizedWeight(nn.Module):
    """A weight of `method` ("int8", "int8-dynamic" or "int4" with `group_size`) for (N, K) = (out_features,
    in_features), in the kernels' layout; its state dict is the file's (see the module docstring).

    `dtype` is the float dtype it stands for: lookups return it, and a cast of the model changes it (never the
    fp32 scales the kernels take). Filled by `load_parts` or `load_state_dict`."""

    def __init__(self, method: str, out_features: int, in_features: int, group_size: int, dtype: torch.dtype):
        super().__init__()
        self.method, self.out_features, self.in_features = method, out_features, in_features
        self.group_size = group_size if method == "int4" else None
        int4 = method == "int4"
        qweight = torch.zeros(
            out_features, in_features // 2 if int4 else in_features, dtype=torch.uint8 if int4 else torch.int8
        )
        self.register_buffer("qweight", qweight, persistent=False)
        scale_shape = (out_features, in_features // group_size) if int4 else (out_features,)
        self.register_buffer("scale", torch.zeros(scale_shape), persistent=False)
        # an empty tensor of the float dtype this weight stands for, cast and moved with the model
        self.register_buffer("_like", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._like.dtype

    @property
    def num_weights(self) -> int:
        """The weights it stands for (Model.num_parameters counts them)."""
        return self.out_features * self.in_features

    def file_shapes(self) -> tuple[tuple[int, ...], ...]:
        scale = self.scale.shape if self.group_size else (self.out_features, 1)
        return tuple(self.qweight.shape), tuple(scale), tuple(scale)

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qdata, scale, zero_point) in the file's layout."""
        if self.group_size:
            qdata, scale = self.qweight ^ NIBBLE_OFFSET, self.scale.half()
        else:
            qdata, scale = self.qweight, self.scale[:, None]
        return qdata, scale, torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)

    @torch.no_grad()
    def load_parts(self, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Take (qdata, scale, zero_point) in the file's layout. Raises ValueError naming the part whose shape or
        dtype differs, or nonzero zero points (the quantization is symmetric)."""
        expected = zip(PARTS, (qdata, scale, zero_point), self.file_shapes(), self._file_dtypes())
        for part, value, shape, dtypes in expected:
            if tuple(value.shape) != shape or value.dtype not in dtypes:
                raise ValueError(
                    f"{part} is {value.dtype} {tuple(value.shape)}, the {self.method} weight needs "
                    f"{' or '.join(map(str, dtypes))} {shape}"
                )
        if not zero_point.is_meta and zero_point.any():
            raise ValueError("zero_point holds nonzero values; llm's quantization is symmetric (zero points 0)")
        self.qweight.copy_(qdata ^ NIBBLE_OFFSET if self.group_size else qdata)
        self.scale.copy_(scale.reshape(self.scale.shape))

    def _file_dtypes(self) -> tuple[tuple[torch.dtype, ...], ...]:
        if self.group_size:
            return (torch.uint8,), (torch.float16,), (torch.int8,)
        return (torch.int8,), (torch.float32,), (torch.int8,)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update({prefix + part: value for part, value in zip(PARTS, self.parts())})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        keys = [prefix + part for part in PARTS]
        missing.extend(k for k in keys if k not in state_dict)
        if strict:
            unexpected.extend(k for k in state_dict if k.startswith(prefix) and k not in keys)
        if all(k in state_dict for k in keys):
            try:
                self.load_parts(*(state_dict[k] for k in keys))
            except ValueError as e:
                error_msgs.append(f"{prefix[:-1]}: {e}")

    def _apply(self, fn, recurse=True):
        scale = self.scale
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:  # the kernels take fp32 scales: keep the exact ones
            self.scale = scale.to(self.scale.device)
        return self

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
        """x (..., K) @ W.T + bias in x's dtype, through the kernel of the method."""
        if self.group_size:
            return kernels.int4_linear(x, self.qweight, self.scale, self.group_size, bias, backend=backend)
        op = kernels.int8_dynamic_linear if self.method == "int8-dynamic" else kernels.int8_linear
        return op(x, self.qweight, self.scale, bias, backend=backend)

    def dequantize(self) -> torch.Tensor:
        """The (N, K) weight it stands for, in `dtype` (what the kernels multiply by, materialised)."""
        if self.group_size:
            return kernels.dequantize_int4(self.qweight, self.scale, self.group_size, self.dtype)
        return kernels.dequantize_int8(self.qweight, self.scale, self.dtype)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows of integer `ids` (...): (..., K) in `dtype`; the table is never dequantized whole."""
        rows, scale = self.qweight[ids.flatten()], self.scale[ids.flatten()]
        if self.group_size:
            w = kernels.dequantize_int4(rows, scale, self.group_size, self.dtype)
        else:
            w = kernels.dequantize_int8(rows, scale, self.dtype)
        return w.view(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.method}, out_features={self.out_features}, in_features={self.in_features}{group}"


class _QuantizedMatmul(nn.Module):
    """What QuantizedLinear and QuantizedLMHead share: x @ W.T + bias on the backend this layer can take,
    chosen at its first call on each device type (see the module docstring)."""

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None, name: str):
        super().__init__()
        self.weight, self.bias, self.name = weight, bias, name
        self._backends: dict[str, str] = {}

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        backend = self._backends.get(x.device.type) or self._choose_backend(x.device.type)
        return self.weight.linear(x, self.bias, backend)

    def _choose_backend(self, device: str) -> str:
        """ "auto", or "torch" with one warning naming this layer when its shape rules the fast kernels out. A
        reason that holds for every layer (no kernel for this CPU) is the dispatcher's to log, once."""
        w, op = self.weight, OPS[self.weight.method]
        backend = "auto"
        if dispatch.fallback_reason(op, device) is None:
            stand_in = torch.empty(0, w.in_features)
            reason = dispatch.fallback_reason(op, device, x=stand_in, group_size=w.group_size or 0)
            if reason:
                logger.warning(
                    f"{self.name} ({w.in_features} -> {w.out_features}, {w.method}): the fast kernel cannot take "
                    f"this layer ({reason}); it runs on the slower torch path"
                )
                backend = "torch"
        self._backends[device] = backend
        return backend


class QuantizedLinear(_QuantizedMatmul):
    """nn.Linear with a QuantizedWeight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class QuantizedLMHead(_QuantizedMatmul):
    """llm.models.layers.LMHead with a QuantizedWeight: the same call and results, the loss computed from the
    logits (llm.kernels.reference.linear_cross_entropy's mean over labels != -100, 0 when there are none)."""

    def forward(
        self, h: torch.Tensor, labels: torch.Tensor | None = None, return_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logits = self.matmul(h)
        loss = None
        if labels is not None:
            labels = labels.flatten()
            total = F.cross_entropy(
                logits.flatten(0, -2).float(), labels, ignore_index=kernels.IGNORE_INDEX, reduction="sum"
            )
            loss = total / (labels != kernels.IGNORE_INDEX).sum().clamp(min=1)
        return (logits if return_logits or labels is None else None), loss


class QuantizedEmbedding(nn.Module):
    """nn.Embedding with a QuantizedWeight: a lookup dequantizes the rows it gathers."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.lookup(ids)
