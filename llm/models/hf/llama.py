"""LLaMA and the models that share its trunk with another spelling of the config: Mistral, Qwen2
(q/k/v biases and no others) and Qwen3 (per-head RMSNorm on q and k). RMSNorm, rotary positions
(with Hugging Face's rope scalings), SwiGLU, grouped-query attention (transformers'
modeling_llama.py, modeling_qwen2.py, modeling_qwen3.py)."""

from __future__ import annotations

from llm.errors import UserError
from llm.log import logger
from llm.models.config import ROPE_SCALING, ModelConfig
from llm.models.hf.base import ClassifierHead, FamilyAdapter, GGUFLayout, require
from llm.models.hf.rules import Rule, fused_rules, linear_rules

# model_type -> llama.cpp's architecture for it (Mistral is llama.cpp's llama); only `llama` rotates adjacent pairs
GGUF_LAYOUTS = {
    "llama": GGUFLayout("llama", adjacent_rotary=True),
    "qwen2": GGUFLayout("qwen2", full_heads=True),
    "qwen3": GGUFLayout("qwen3"),
}
# model_type -> how its architectures begin ("Qwen2ForCausalLM")
SPELLING = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
ROPE_TYPES = ("default", *ROPE_SCALING)


class Llama(FamilyAdapter):
    family = "llama"
    model_types = {kind: f"{name}ForCausalLM" for kind, name in SPELLING.items()}
    architectures = {
        **{f"{name}ForCausalLM": ("causal_lm", {}) for name in SPELLING.values()},
        **{f"{name}Model": ("encoder", {}) for name in SPELLING.values()},
        **{f"{name}ForSequenceClassification": ("text_classification", {}) for name in SPELLING.values()},
    }
    prefix = "model."
    export_fields = dict(
        norm="rmsnorm", norm_position="pre", position="rotary", mlp="swiglu", causal=True, pooler=False
    )
    classifier = ClassifierHead(pooling="last", name="score", bias=False)
    ignored_suffixes = ("rotary_emb.inv_freq",)  # recomputed from rope_theta

    def trunk_rules(self, cfg: ModelConfig, mask_token: bool = False) -> list[Rule]:
        t, rules, bias = "transformer", [], cfg.bias
        for i in range(cfg.n_layers):
            b, h = f"{t}.blocks.{i}", f"layers.{i}"
            rules += linear_rules(f"{b}.attn_norm", f"{h}.input_layernorm", bias=False)
            rules += linear_rules(f"{b}.mlp_norm", f"{h}.post_attention_layernorm", bias=False)
            rules += fused_rules(f"{b}.attn.qkv", [f"{h}.self_attn.{p}_proj" for p in "qkv"], cfg.attn_bias)
            if cfg.qk_norm:
                rules += [Rule(f"{b}.attn.{p}_norm.weight", (f"{h}.self_attn.{p}_norm.weight",)) for p in "qk"]
            rules += linear_rules(f"{b}.attn.proj", f"{h}.self_attn.o_proj", bias=bias)
            rules += fused_rules(f"{b}.mlp.fc_in", [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"], bias)
            rules += linear_rules(f"{b}.mlp.fc_out", f"{h}.mlp.down_proj", bias=bias)
        rules += [Rule(f"{t}.tok_embed.weight", ("embed_tokens.weight",))]
        return rules + linear_rules(f"{t}.norm", "norm", bias=False)

    def fields_from_hf(self, config: dict, where: str) -> dict:
        """One trunk for all four model types; what differs is which biases exist, q/k norms, and
        which config keys spell them."""
        get, kind = config.get, config.get("model_type", "llama")
        act = get("hidden_act", "silu")
        require(act in ("silu", "swish"), where, f"hidden_act {act!r} (expected 'silu')")  # ACT2FN: one function
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        theta = rope.pop("rope_theta", get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        require(rope.pop("partial_rotary_factor", 1.0) == 1.0, where, "partial_rotary_factor != 1 is not supported")
        require(rope_type in ROPE_TYPES, where, f"rope scaling {rope_type!r} is not supported ({ROPE_TYPES})")
        scaling = None
        if rope_type != "default":  # keys the scaling does not read: transformers warns and ignores them too
            required, optional = ROPE_SCALING[rope_type]
            unread = sorted(set(rope) - required - optional)
            if unread:
                logger.warning(f"{where}: rope scaling {rope_type!r} does not read {', '.join(unread)}; ignored")
            scaling = {"rope_type": rope_type, **{k: v for k, v in rope.items() if k not in unread}}
        if rope_type == "dynamic":  # transformers scales against max_position_embeddings
            scaling.pop("original_max_position_embeddings", None)
        window = get("sliding_window")
        uses_window = get("use_sliding_window", kind == "mistral") and window is not None
        max_pos = get("max_position_embeddings", 2048)
        require(
            not uses_window or window >= max_pos,
            where,
            f"sliding_window={window} < max_position_embeddings={max_pos}: sliding-window attention is not supported",
        )
        if kind == "qwen2":  # q, k, v carry biases; o and the MLP never do
            qkv_bias, bias = True, False
        elif kind == "qwen3":
            require(not get("attention_bias", False), where, "attention_bias=true is not supported for qwen3")
            qkv_bias, bias = None, False
        elif kind == "mistral":
            qkv_bias, bias = None, False
        else:
            bias = get("attention_bias", False)
            require(bias == get("mlp_bias", False), where, "attention_bias and mlp_bias must be equal")
            qkv_bias = None
        d, heads = get("hidden_size", 4096), get("num_attention_heads", 32)
        head_dim = get("head_dim") or d // heads
        require(head_dim * heads == d, where, f"head_dim={head_dim} * heads={heads} != hidden_size={d}")
        return dict(
            vocab_size=get("vocab_size", 32000),
            max_seq_len=max_pos,
            d_model=d,
            n_layers=get("num_hidden_layers", 32),
            n_heads=heads,
            n_kv_heads=get("num_key_value_heads") or heads,
            d_ff=get("intermediate_size", 11008),
            norm="rmsnorm",
            norm_position="pre",
            norm_eps=get("rms_norm_eps", 1e-6),
            position="rotary",
            rope_theta=theta,
            rope_scaling=scaling,
            mlp="swiglu",
            bias=bias,
            qkv_bias=qkv_bias,
            qk_norm=kind == "qwen3",
            dropout=0.0,
            attention_dropout=get("attention_dropout", 0.0),
            tie_embeddings=get("tie_word_embeddings", False),
            causal=True,
        )

    def model_type(self, cfg: ModelConfig) -> str:
        """q/k norms make it Qwen3, q/k/v biases without others Qwen2, anything else LLaMA."""
        if cfg.qk_norm:
            return "qwen3"
        return "qwen2" if cfg.attn_bias and not cfg.bias else "llama"

    def architecture(self, cfg: ModelConfig, task: str, options: dict) -> str | None:
        """The task's LLaMA architecture, spelt for the model type `cfg` needs (Qwen2ForCausalLM, ...)."""
        arch = super().architecture(cfg, task, options)
        return None if arch is None else arch.replace("Llama", SPELLING[self.model_type(cfg)], 1)

    def fields_to_hf(self, cfg: ModelConfig) -> dict:
        kind = self.model_type(cfg)
        out = dict(
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_seq_len,
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.d_ff,
            hidden_act="silu",
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,  # transformers 4.x reads this and rope_scaling, 5.x rope_parameters
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
            rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
            attention_bias=cfg.attn_bias if kind == "qwen3" else cfg.bias,
            mlp_bias=cfg.bias,
            attention_dropout=cfg.attention_dropout,
            tie_word_embeddings=cfg.tie_embeddings,
        )
        if kind != "llama":
            out.update(use_sliding_window=False, sliding_window=None)
        return out

    def gguf_layout(self, cfg: ModelConfig) -> GGUFLayout:
        """llama.cpp's llama, qwen2 or qwen3, as the model type `cfg` needs."""
        self.check_exportable(cfg, self.architecture(cfg, "causal_lm", {}))
        return GGUF_LAYOUTS[self.model_type(cfg)]

    def check_exportable(self, cfg: ModelConfig, arch: str) -> None:
        if cfg.qk_norm and (cfg.attn_bias or cfg.bias):
            raise UserError("model.qk_norm: only Qwen3 has q/k norms, and it has no biases (set bias: false)")
        if cfg.qkv_bias is not None and cfg.qkv_bias != cfg.bias and cfg.bias:
            raise UserError(f"model.qkv_bias: {arch} cannot have q/k/v biases differ from the others' ({cfg.bias})")
        super().check_exportable(cfg, arch)
