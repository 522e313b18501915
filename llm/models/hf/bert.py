"""BERT: post-LayerNorm encoder with learned positions and token-type embeddings, a pooler
(dense + tanh over [CLS]) inside the trunk (transformers' modeling_bert.py). ViT's encoder is
BERT's with other names (transformers copies it), so the encoder helpers here serve both."""

from __future__ import annotations

from llm.errors import UserError
from llm.models.config import ModelConfig
from llm.models.hf.base import ClassifierHead, FamilyAdapter, activation, check_gelu_stack, require
from llm.models.hf.rules import Rule, fused_rules, linear_rules


def encoder_layer_rules(cfg: ModelConfig, attention: str, norms: tuple[str, str]) -> list[Rule]:
    """Every encoder layer ("encoder.layer.{i}"): q/k/v under `attention` ("attention.self"), the
    norms before (ViT) or after (BERT) attention and MLP named by `norms`."""
    rules = []
    for i in range(cfg.n_layers):
        b, h = f"transformer.blocks.{i}", f"encoder.layer.{i}"
        rules += fused_rules(f"{b}.attn.qkv", [f"{h}.{attention}.{p}" for p in ("query", "key", "value")], True)
        rules += linear_rules(f"{b}.attn.proj", f"{h}.attention.output.dense")
        rules += linear_rules(f"{b}.mlp.fc_in", f"{h}.intermediate.dense")
        rules += linear_rules(f"{b}.mlp.fc_out", f"{h}.output.dense")
        rules += linear_rules(f"{b}.attn_norm", f"{h}.{norms[0]}") + linear_rules(f"{b}.mlp_norm", f"{h}.{norms[1]}")
    return rules


def pooler_rules(cfg: ModelConfig) -> list[Rule]:
    """The pooler, where `cfg` has one: inside the trunk ("bert.pooler"; ViT's only in ViTModel)."""
    return linear_rules("pooler.dense", "pooler.dense") if cfg.pooler else []


def encoder_fields_from_hf(config: dict, where: str, dropout: float) -> dict:
    """The fields BERT and ViT spell alike; `dropout`: the default of both dropout probabilities."""
    get = config.get
    return dict(
        d_model=get("hidden_size", 768),
        n_layers=get("num_hidden_layers", 12),
        n_heads=get("num_attention_heads", 12),
        d_ff=get("intermediate_size", 3072),
        norm="layernorm",
        norm_eps=get("layer_norm_eps", 1e-12),
        position="learned",
        mlp=activation(get("hidden_act", "gelu"), where),
        bias=True,
        dropout=get("hidden_dropout_prob", dropout),
        attention_dropout=get("attention_probs_dropout_prob", dropout),
        causal=False,
    )


def encoder_fields_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        hidden_act="gelu" if cfg.mlp == "gelu" else "gelu_pytorch_tanh",
        layer_norm_eps=cfg.norm_eps,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
    )


class Bert(FamilyAdapter):
    family = "bert"
    model_types = {"bert": "BertModel"}
    architectures = {
        "BertForPreTraining": ("masked_lm", {"nsp": True}),
        "BertForMaskedLM": ("masked_lm", {"nsp": False}),
        "BertModel": ("encoder", {}),
        "BertForSequenceClassification": ("text_classification", {}),
    }
    prefix = "bert."
    export_fields = dict(norm="layernorm", norm_position="post", position="learned", bias=True, tie_embeddings=True)
    classifier = ClassifierHead(pooling="first", name="classifier", bias=True, pooler=True)
    ignored_suffixes = ("position_ids",)  # a buffer of arange(max_position_embeddings)
    legacy_names = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}  # TF-era checkpoints

    def trunk_rules(self, cfg: ModelConfig, mask_token: bool = False) -> list[Rule]:
        t, e = "transformer", "embeddings"
        rules = encoder_layer_rules(cfg, "attention.self", ("attention.output.LayerNorm", "output.LayerNorm"))
        rules += [
            Rule(f"{t}.tok_embed.weight", (f"{e}.word_embeddings.weight",)),
            Rule(f"{t}.pos_embed.weight", (f"{e}.position_embeddings.weight",)),
            Rule(f"{t}.type_embed.weight", (f"{e}.token_type_embeddings.weight",)),
        ]
        return rules + linear_rules(f"{t}.embed_norm", f"{e}.LayerNorm") + pooler_rules(cfg)

    def fields_from_hf(self, config: dict, where: str) -> dict:
        get = config.get
        encoder = encoder_fields_from_hf(config, where, dropout=0.1)
        require(
            get("position_embedding_type", "absolute") == "absolute",
            where,
            f"position_embedding_type {get('position_embedding_type')!r} (expected 'absolute')",
        )
        require(not get("is_decoder", False), where, "BERT as a decoder is not supported")
        if self.architectures.get(self.architecture_named(config), ("",))[0] == "masked_lm":  # the one with a decoder
            require(get("tie_word_embeddings", True), where, "an MLM decoder untied from the embeddings")
        return dict(
            encoder,
            vocab_size=get("vocab_size", 30522),
            max_seq_len=get("max_position_embeddings", 512),
            norm_position="post",
            type_vocab_size=get("type_vocab_size", 2),
            tie_embeddings=True,
        )

    def fields_to_hf(self, cfg: ModelConfig) -> dict:
        return dict(
            encoder_fields_to_hf(cfg),
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_seq_len,
            type_vocab_size=cfg.type_vocab_size,
            position_embedding_type="absolute",
        )

    def check_exportable(self, cfg: ModelConfig, arch: str) -> None:
        if cfg.type_vocab_size == 0:
            raise UserError("model.type_vocab_size: a BERT export needs token-type embeddings (got 0)")
        check_gelu_stack(cfg, arch)
        super().check_exportable(cfg, arch)
