"""Assembly: recipes and paths become parts, parts run, results are written.

Each command of `llm` calls one function here, and llm.cli builds its flags from that function's
signature and docstring: positional parameters are positional arguments, keyword-only ones flags. A
command function prints what the user reads and returns it for Python callers.
- `train.pretrain` / `finetune` / `distill`: a recipe file -> `train.train(recipe)` (`assemble` builds
  the parts);
- `loader.load_model(path)`: any path -> model; `save_pretrained` / `load_pretrained`;
- `evaluate.evaluate_model`, `generate.generate_text`, `convert.convert`, `info.model_info`,
  `compress.*`, `plot.plot_run`; `data.*` and `bench.*` call llm.data and llm.bench.
"""
