"""GPT-2: learned positions, pre-LayerNorm, GELU MLP; its Conv1D layers store weights transposed
(transformers' modeling_gpt2.py)."""

from __future__ import annotations

from llm.errors import UserError
from llm.models.config import ModelConfig
from llm.models.hf.base import ClassifierHead, FamilyAdapter, GGUFLayout, activation, check_gelu_stack, require
from llm.models.hf.rules import Rule, linear_rules

ACTIVATION_NAME = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # our mlp -> GPT-2's spelling


class GPT2(FamilyAdapter):
    family = "gpt"
    model_types = {"gpt2": "GPT2LMHeadModel"}
    architectures = {
        "GPT2LMHeadModel": ("causal_lm", {}),
        "GPT2Model": ("encoder", {}),
        "GPT2ForSequenceClassification": ("text_classification", {}),
    }
    prefix = "transformer."
    export_fields = dict(
        norm="layernorm", norm_position="pre", position="learned", bias=True, causal=True, pooler=False
    )
    classifier = ClassifierHead(pooling="last", name="score", bias=False)
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")  # the causal mask, stored as buffers
    bos_is_eos = True

    def trunk_rules(self, cfg: ModelConfig, mask_token: bool = False) -> list[Rule]:
        t, rules = "transformer", []
        for i in range(cfg.n_layers):
            b, h = f"{t}.blocks.{i}", f"h.{i}"
            rules += linear_rules(f"{b}.attn_norm", f"{h}.ln_1") + linear_rules(f"{b}.mlp_norm", f"{h}.ln_2")
            rules += linear_rules(f"{b}.attn.qkv", f"{h}.attn.c_attn", op="t")
            rules += linear_rules(f"{b}.attn.proj", f"{h}.attn.c_proj", op="t")
            rules += linear_rules(f"{b}.mlp.fc_in", f"{h}.mlp.c_fc", op="t")
            rules += linear_rules(f"{b}.mlp.fc_out", f"{h}.mlp.c_proj", op="t")
        rules += [Rule(f"{t}.tok_embed.weight", ("wte.weight",)), Rule(f"{t}.pos_embed.weight", ("wpe.weight",))]
        return rules + linear_rules(f"{t}.norm", "ln_f")

    def fields_from_hf(self, config: dict, where: str) -> dict:
        get = config.get
        require(get("scale_attn_weights", True), where, "scale_attn_weights=false is not supported")
        require(not get("scale_attn_by_inverse_layer_idx", False), where, "scale_attn_by_inverse_layer_idx")
        # add_cross_attention: those layers read an encoder's states, which llm never passes (tensors ignored)
        d = get("n_embd", 768)
        return dict(
            vocab_size=get("vocab_size", 50257),
            max_seq_len=get("n_positions", 1024),
            d_model=d,
            n_layers=get("n_layer", 12),
            n_heads=get("n_head", 12),
            d_ff=get("n_inner") or 4 * d,
            norm="layernorm",
            norm_position="pre",
            norm_eps=get("layer_norm_epsilon", 1e-5),
            position="learned",
            mlp=activation(get("activation_function", "gelu_new"), where),
            bias=True,
            dropout=get("resid_pdrop", 0.1),
            attention_dropout=get("attn_pdrop", 0.1),
            tie_embeddings=get("tie_word_embeddings", True),
            causal=True,
        )

    def fields_to_hf(self, cfg: ModelConfig) -> dict:
        return dict(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            activation_function=ACTIVATION_NAME[cfg.mlp],
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.attention_dropout,
            tie_word_embeddings=cfg.tie_embeddings,
        )

    def gguf_layout(self, cfg: ModelConfig) -> GGUFLayout:
        """llama.cpp's gpt2: GPT2LMHeadModel's tensors, q/k/v fused, the tanh GELU."""
        self.check_exportable(cfg, "GPT2LMHeadModel")
        if cfg.mlp != "gelu_tanh":
            raise UserError(f"model.mlp: llama.cpp's gpt2 uses the tanh GELU (gelu_tanh), got {cfg.mlp!r}")
        return GGUFLayout("gpt2", fused_qkv=True, full_heads=True)

    def check_exportable(self, cfg: ModelConfig, arch: str) -> None:
        check_gelu_stack(cfg, arch)
        super().check_exportable(cfg, arch)
