"""Compression: quantization, pruning and distillation of trained models, and their report.

One file per idea: `quantize.py` (int8 / int4 / dynamic int8, torchao's grid, saved as plain tensors) and
`quantized.py` (the layers a quantized model runs on, over llm's kernels),
`prune.py` (magnitude and Wanda unstructured or n:m, structured heads/neurons, gradual), `distill.py`
(the teacher -> student objective), `report.py` (size, speed and quality measurements, table/PNG),
`calibrate.py` (layer-by-layer calibration, sharded over ranks) under `gptq.py`, `awq.py` (both write
today's int4/int8 format) and `sparsegpt.py` (unstructured and n:m).

Quantization and structured pruning change a model's modules, so they are model transforms
(`llm.adapt.base.Transform`: each file ends in its `TRANSFORM`); `llm.transforms` lists them
with the fine-tuning ones, so a saved model's record rebuilds them on load.
"""
