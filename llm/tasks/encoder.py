"""The bare trunk (GPT2Model, LlamaModel, BertModel, ViTModel): features, no objective.

Used to read and write Hugging Face base models and as the body that other
tasks put a new head on; it has no loss, so it is not trained by itself.
"""

from __future__ import annotations

from llm.models.base import Model, Pooler
from llm.models.config import ModelConfig
from llm.models.transformer import ModelOutput
from llm.tasks.base import Task


class Encoder(Model):
    """Final hidden states (B, T, d), and the pooled first token (B, d) when the config has a pooler."""

    task = "encoder"

    def __init__(self, cfg: ModelConfig, options=None):
        super().__init__(cfg, options)
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        pixel_values=None,
        interpolate_pos_encoding=False,
    ) -> ModelOutput:
        h = self.transformer(
            input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        pooled = self.pooler(h[:, 0]) if self.pooler is not None else None
        return ModelOutput(hidden_states=h, pooled=pooled)


class EncoderTask(Task):
    name = "encoder"
    model_class = Encoder
    nested = False  # Hugging Face base models keep the trunk at the top level, not under a prefix
