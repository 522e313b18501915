"""Assembly: recipes and paths become parts, parts run, results are written.

The commands (llm.cli) call these functions; nothing below this layer imports it.
- `train.train(recipe)`: pretraining and fine-tuning (`assemble` builds the parts);
- `loader.load_model(path)`: any path -> model; `save_pretrained` / `load_pretrained`;
- `evaluate.evaluate_model`, `generate.generate_text`, `convert.convert`.
"""
