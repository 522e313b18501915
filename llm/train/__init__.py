"""Training on DeepSpeed: the loop (trainer.py), the engine and its JSON (engine.py),
checkpoints, schedules, metrics and distributed discovery. It takes built parts;
llm.run assembles them from a recipe."""
