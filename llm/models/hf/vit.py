"""ViT: BERT's encoder with pre-LayerNorm over 16x16 (patch_size) patch embeddings and a [CLS]
token (Dosovitskiy et al., 2021; transformers' modeling_vit.py); no vocabulary, no special ids."""

from __future__ import annotations

from llm.models.config import ModelConfig
from llm.models.hf.base import FamilyAdapter, check_gelu_stack, require
from llm.models.hf.bert import encoder_fields_from_hf, encoder_fields_to_hf, encoder_layer_rules, pooler_rules
from llm.models.hf.rules import Rule, linear_rules


class ViT(FamilyAdapter):
    family = "vit"
    model_types = {"vit": "ViTModel"}
    architectures = {
        "ViTModel": ("encoder", {}),
        "ViTForImageClassification": ("image_classification", {}),
        "ViTForMaskedImageModeling": ("masked_image_modeling", {}),
    }
    prefix = "vit."
    export_fields = dict(norm="layernorm", norm_position="pre", bias=True, causal=False)

    def trunk_rules(self, cfg: ModelConfig, mask_token: bool = False) -> list[Rule]:
        t, e = "transformer", "embeddings"
        rules = encoder_layer_rules(cfg, "attention.attention", ("layernorm_before", "layernorm_after"))
        rules += [Rule(f"{t}.cls_token", (f"{e}.cls_token",)), Rule(f"{t}.pos_embed", (f"{e}.position_embeddings",))]
        rules += linear_rules(f"{t}.patch_embed", f"{e}.patch_embeddings.projection")
        rules += linear_rules(f"{t}.norm", "layernorm")
        if mask_token:
            rules += [Rule(f"{t}.mask_token", (f"{e}.mask_token",))]
        return rules + pooler_rules(cfg)

    def fields_from_hf(self, config: dict, where: str) -> dict:
        get = config.get
        encoder = encoder_fields_from_hf(config, where, dropout=0.0)
        require(get("qkv_bias", True), where, "qkv_bias=false is not supported")
        d, patch = encoder["d_model"], get("patch_size", 16)
        arch = self.architecture_named(config)
        if arch == "ViTModel":  # the one with a pooler (the others build theirs without)
            require(get("pooler_act", "tanh") == "tanh", where, f"pooler_act {get('pooler_act')!r} (expected 'tanh')")
            require(get("pooler_output_size") in (None, d), where, "pooler_output_size must equal hidden_size")
        if arch == "ViTForMaskedImageModeling":  # encoder_stride shapes its decoder, and only that
            require(get("encoder_stride", patch) == patch, where, "encoder_stride must equal patch_size")
        return dict(
            encoder,
            norm_position="pre",
            image_size=get("image_size", 224),
            patch_size=patch,
            num_channels=get("num_channels", 3),
            tie_embeddings=False,
        )

    def fields_to_hf(self, cfg: ModelConfig) -> dict:
        return dict(
            encoder_fields_to_hf(cfg),
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_channels=cfg.num_channels,
            encoder_stride=cfg.patch_size,
            qkv_bias=True,
        )

    def check_exportable(self, cfg: ModelConfig, arch: str) -> None:
        check_gelu_stack(cfg, arch)
        super().check_exportable(cfg, arch)
