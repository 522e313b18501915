"""Rotary inverse frequencies, plain and scaled, always computed in float32.

Scaled variants follow the papers and the parameter names Hugging Face uses in
`rope_scaling` (so configs carry over unchanged):
- linear: position interpolation, every frequency divided by `factor`
  (Chen et al., 2023, "Extending Context Window of Large Language Models via Positional Interpolation");
- dynamic: NTK-aware base growth once the sequence passes the trained length
  (bloc97 and emozilla, 2023; Hugging Face `dynamic`);
- llama3: low frequencies divided by `factor`, high ones kept, a smooth ramp between
  (Meta, Llama 3.1 reference code);
- yarn: per-dimension blend of interpolation and extrapolation and an attention
  temperature on cos/sin (Peng et al., 2023, "YaRN", arXiv:2309.00071).
"""

from __future__ import annotations

import math

import torch


def default_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """1 / theta^(2i / head_dim) for i < head_dim / 2, float32 (head_dim / 2,)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict | None, max_seq_len: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 (head_dim / 2,), attention scaling of cos and sin) for `scaling`
    (a validated `ModelConfig.rope_scaling`, or None). `seq_len` matters only to `dynamic`:
    the longest sequence of the current forward."""
    kind = (scaling or {}).get("rope_type", "default")
    inv_freq = default_frequencies(head_dim, theta)
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        seq = max(seq_len or 0, max_seq_len)
        base = theta * ((factor * seq / max_seq_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return default_frequencies(head_dim, base), 1.0
    if kind == "llama3":
        old = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling, factor)
    raise ValueError(f"rope_type {kind!r} is not supported")


def _yarn(inv_freq: torch.Tensor, dim: int, theta: float, s: dict, factor: float) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention = mscale(factor)
    original = s["original_max_position_embeddings"]

    def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(s.get("beta_fast") or 32), dimension(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate, float(attention)
