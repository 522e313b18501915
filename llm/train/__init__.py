"""Training on DeepSpeed: the loop, schedules, checkpoints, metrics, distributed discovery.

`Trainer(recipe)` builds everything from a recipe; `pretrain(recipe)` runs it.
`load_model_from_checkpoint(path)` rebuilds a trained model from any ZeRO stage.
"""

from llm.train.checkpoint import load_model_from_checkpoint

__all__ = ["Trainer", "load_model_from_checkpoint", "pretrain"]


def __getattr__(name):
    if name == "Trainer":
        from llm.train.trainer import Trainer

        return Trainer
    if name == "pretrain":
        from llm.train.run import pretrain

        return pretrain
    raise AttributeError(name)
