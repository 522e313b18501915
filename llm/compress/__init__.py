"""Compression: quantization, pruning and distillation of trained models, and their report.

One file per idea: `quantize.py` (torchao int8 / int4 / dynamic int8, saved as plain tensors),
`prune.py` (magnitude and Wanda unstructured or n:m, structured heads/neurons, gradual), `distill.py`
(the teacher -> student objective), `report.py` (size, speed and quality measurements, table/PNG),
`calibrate.py` (layer-by-layer calibration, sharded over ranks) under `gptq.py`, `awq.py` (both write
today's int4/int8 format) and `sparsegpt.py` (unstructured and n:m).

Quantization and structured pruning change a model's modules, so they are model transforms
(`apply(model, settings, path) -> model`, as in `llm.adapt`): importing this package adds
"quantize" and "prune" to `llm.adapt.TRANSFORMS`, so a saved model's record rebuilds them on load.
"""

from __future__ import annotations

from llm import adapt
from llm.compress import prune, quantize

adapt.TRANSFORMS.setdefault("quantize", quantize.apply)
adapt.TRANSFORMS.setdefault("prune", prune.apply)
