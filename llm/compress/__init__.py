"""Compression: quantization, pruning and distillation of trained models, and their report.

One file per idea: `quantize.py` (torchao int8 / int4 / dynamic int8, saved as plain tensors),
`prune.py` (magnitude and Wanda unstructured, structured heads/neurons, gradual), `distill.py`
(the teacher -> student objective), `report.py` (size, speed and quality measurements, table/PNG).

Quantization and structured pruning change a model's modules, so they are model transforms
(`llm.adapt.base.Transform`: each file ends in its `TRANSFORM`); `llm.transforms` lists them
with the fine-tuning ones, so a saved model's record rebuilds them on load.
"""
