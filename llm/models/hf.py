"""Hugging Face interop of the trunk: config.json fields and weight names per family.

Each family maps its config to a `ModelConfig` and its trunk weights to ours
through one list of rules; the same rules run backwards on export, so HF -> llm
-> HF reproduces every tensor bit for bit. Heads are the tasks' (each task file
lists its architectures and head rules); `llm.tasks.hf` joins the two. Nothing
here imports `transformers`: config.json is plain JSON and the weights are
safetensors (or a pytorch_model.bin read with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.errors import UserError
from llm.models.config import ModelConfig

MODEL_TYPE = {"gpt": "gpt2", "llama": "llama", "bert": "bert", "vit": "vit"}
# Hugging Face model types that are our "llama" trunk with a different spelling of the same config
LLAMA_LIKE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
FAMILY = {**{v: k for k, v in MODEL_TYPE.items()}, **dict.fromkeys(LLAMA_LIKE, "llama")}
# Where the trunk sits inside a head model's state dict (GPT2LMHeadModel: "transformer.h.0...").
BASE_PREFIX = {"gpt": "transformer.", "llama": "model.", "bert": "bert.", "vit": "vit."}
# Buffers and tied duplicates that some checkpoints carry and nothing needs.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq")

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
ACTIVATION_NAME = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # GPT-2 spelling; BERT/ViT use gelu_pytorch_tanh


# ----------------------------------------------------------------------------
# Weight mapping rules
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the Hugging Face tensor(s) it is made of.

    op: "copy"; "t" (GPT-2's Conv1D stores weights transposed); "cat" (our fused
    qkv / gate+up is the HF tensors concatenated on dim 0); "conv1x1" (a 1x1
    convolution used as a linear layer). `base` rules live under the trunk prefix.
    """

    ours: str
    theirs: tuple[str, ...]
    op: str = "copy"
    base: bool = True


def linear_rules(ours: str, theirs: str, bias: bool = True, op: str = "copy", base: bool = True) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", (f"{theirs}.weight",), op, base)]
    if bias:
        rules.append(Rule(f"{ours}.bias", (f"{theirs}.bias",), "copy", base))
    return rules


def fused_rules(ours: str, theirs: list[str], bias: bool) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), "cat")]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), "cat"))
    return rules


def trunk_rules(cfg: ModelConfig, mask_token: bool = False) -> list[Rule]:
    """Every trunk tensor (and the pooler) for `cfg` and where it lives in a Hugging Face state dict."""
    t, rules = "transformer", []
    for i in range(cfg.n_layers):
        b = f"{t}.blocks.{i}"
        if cfg.family == "gpt":
            h = f"h.{i}"
            rules += linear_rules(f"{b}.attn_norm", f"{h}.ln_1") + linear_rules(f"{b}.mlp_norm", f"{h}.ln_2")
            rules += linear_rules(f"{b}.attn.qkv", f"{h}.attn.c_attn", op="t")
            rules += linear_rules(f"{b}.attn.proj", f"{h}.attn.c_proj", op="t")
            rules += linear_rules(f"{b}.mlp.fc_in", f"{h}.mlp.c_fc", op="t")
            rules += linear_rules(f"{b}.mlp.fc_out", f"{h}.mlp.c_proj", op="t")
        elif cfg.family == "llama":
            h, bias = f"layers.{i}", cfg.bias
            rules += linear_rules(f"{b}.attn_norm", f"{h}.input_layernorm", bias=False)
            rules += linear_rules(f"{b}.mlp_norm", f"{h}.post_attention_layernorm", bias=False)
            rules += fused_rules(f"{b}.attn.qkv", [f"{h}.self_attn.{p}_proj" for p in "qkv"], cfg.attn_bias)
            if cfg.qk_norm:
                rules += [Rule(f"{b}.attn.{p}_norm.weight", (f"{h}.self_attn.{p}_norm.weight",)) for p in "qk"]
            rules += linear_rules(f"{b}.attn.proj", f"{h}.self_attn.o_proj", bias=bias)
            rules += fused_rules(f"{b}.mlp.fc_in", [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"], bias)
            rules += linear_rules(f"{b}.mlp.fc_out", f"{h}.mlp.down_proj", bias=bias)
        else:  # bert and vit share the encoder layout
            h = f"encoder.layer.{i}"
            qkv = "attention.self" if cfg.family == "bert" else "attention.attention"
            rules += fused_rules(f"{b}.attn.qkv", [f"{h}.{qkv}.{p}" for p in ("query", "key", "value")], True)
            rules += linear_rules(f"{b}.attn.proj", f"{h}.attention.output.dense")
            rules += linear_rules(f"{b}.mlp.fc_in", f"{h}.intermediate.dense")
            rules += linear_rules(f"{b}.mlp.fc_out", f"{h}.output.dense")
            if cfg.family == "bert":
                rules += linear_rules(f"{b}.attn_norm", f"{h}.attention.output.LayerNorm")
                rules += linear_rules(f"{b}.mlp_norm", f"{h}.output.LayerNorm")
            else:
                rules += linear_rules(f"{b}.attn_norm", f"{h}.layernorm_before")
                rules += linear_rules(f"{b}.mlp_norm", f"{h}.layernorm_after")

    if cfg.family == "gpt":
        rules += [Rule(f"{t}.tok_embed.weight", ("wte.weight",)), Rule(f"{t}.pos_embed.weight", ("wpe.weight",))]
        rules += linear_rules(f"{t}.norm", "ln_f")
    elif cfg.family == "llama":
        rules += [Rule(f"{t}.tok_embed.weight", ("embed_tokens.weight",))]
        rules += linear_rules(f"{t}.norm", "norm", bias=False)
    elif cfg.family == "bert":
        e = "embeddings"
        rules += [
            Rule(f"{t}.tok_embed.weight", (f"{e}.word_embeddings.weight",)),
            Rule(f"{t}.pos_embed.weight", (f"{e}.position_embeddings.weight",)),
            Rule(f"{t}.type_embed.weight", (f"{e}.token_type_embeddings.weight",)),
        ]
        rules += linear_rules(f"{t}.embed_norm", f"{e}.LayerNorm")
    else:
        e = "embeddings"
        rules += [
            Rule(f"{t}.cls_token", (f"{e}.cls_token",)),
            Rule(f"{t}.pos_embed", (f"{e}.position_embeddings",)),
        ]
        rules += linear_rules(f"{t}.patch_embed", f"{e}.patch_embeddings.projection")
        rules += linear_rules(f"{t}.norm", "layernorm")
        if mask_token:
            rules += [Rule(f"{t}.mask_token", (f"{e}.mask_token",))]

    if cfg.pooler:  # BERT's pooler sits inside the trunk ("bert.pooler"), ViT's only in ViTModel
        rules += linear_rules("pooler.dense", "pooler.dense")
    return rules


def to_ours(rule: Rule, tensors: list[torch.Tensor]) -> torch.Tensor:
    if rule.op == "t":
        return tensors[0].t()
    if rule.op == "cat":
        return torch.cat(tensors, dim=0)
    if rule.op == "conv1x1":
        return tensors[0].flatten(1) if tensors[0].dim() == 4 else tensors[0]
    return tensors[0]


def to_theirs(rule: Rule, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    if rule.op == "t":
        return [tensor.t()]
    if rule.op == "cat":
        if len(rule.theirs) == 3:  # q, k, v
            q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
            return list(tensor.split((q, kv, kv), dim=0))
        return list(tensor.chunk(len(rule.theirs), dim=0))
    if rule.op == "conv1x1":
        return [tensor[:, :, None, None] if tensor.dim() == 2 else tensor]
    return [tensor]


# ----------------------------------------------------------------------------
# Config mapping
# ----------------------------------------------------------------------------


def _activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise UserError(f"{where}: activation {name!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise UserError(f"{where}: {message}")


def config_from_hf(c: dict, family: str, where: str) -> dict:
    """Our ModelConfig fields (a dict, validated later) for a Hugging Face config.json;
    `pooler` is left to the caller (whether the weights hold one)."""
    get = c.get
    common = dict(family=family, init_std=get("initializer_range", 0.02))
    if family == "gpt":
        require(get("scale_attn_weights", True), where, "scale_attn_weights=false is not supported")
        require(not get("scale_attn_by_inverse_layer_idx", False), where, "scale_attn_by_inverse_layer_idx")
        require(not get("add_cross_attention", False), where, "cross-attention is not supported")
        d = get("n_embd", 768)
        return dict(
            common,
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
            mlp=_activation(get("activation_function", "gelu_new"), where),
            bias=True,
            dropout=get("resid_pdrop", 0.1),
            attention_dropout=get("attn_pdrop", 0.1),
            tie_embeddings=get("tie_word_embeddings", True),
            causal=True,
        )
    if family == "llama":
        return dict(common, **_llama_fields(c, where))
    # bert and vit
    encoder = dict(
        common,
        d_model=get("hidden_size", 768),
        n_layers=get("num_hidden_layers", 12),
        n_heads=get("num_attention_heads", 12),
        d_ff=get("intermediate_size", 3072),
        norm="layernorm",
        norm_eps=get("layer_norm_eps", 1e-12),
        position="learned",
        mlp=_activation(get("hidden_act", "gelu"), where),
        bias=True,
        dropout=get("hidden_dropout_prob", 0.1 if family == "bert" else 0.0),
        attention_dropout=get("attention_probs_dropout_prob", 0.1 if family == "bert" else 0.0),
        causal=False,
    )
    if family == "bert":
        require(
            get("position_embedding_type", "absolute") == "absolute",
            where,
            f"position_embedding_type {get('position_embedding_type')!r} (expected 'absolute')",
        )
        require(not get("is_decoder", False), where, "BERT as a decoder is not supported")
        require(get("tie_word_embeddings", True), where, "an MLM decoder untied from the embeddings")
        return dict(
            encoder,
            vocab_size=get("vocab_size", 30522),
            max_seq_len=get("max_position_embeddings", 512),
            norm_position="post",
            type_vocab_size=get("type_vocab_size", 2),
            tie_embeddings=True,
        )
    require(get("qkv_bias", True), where, "qkv_bias=false is not supported")
    require(get("pooler_act", "tanh") == "tanh", where, f"pooler_act {get('pooler_act')!r} (expected 'tanh')")
    d, patch = encoder["d_model"], get("patch_size", 16)
    require(get("pooler_output_size") in (None, d), where, "pooler_output_size must equal hidden_size")
    require(get("encoder_stride", patch) == patch, where, "encoder_stride must equal patch_size")
    return dict(
        encoder,
        norm_position="pre",
        image_size=get("image_size", 224),
        patch_size=patch,
        num_channels=get("num_channels", 3),
        tie_embeddings=False,
    )


def _llama_fields(c: dict, where: str) -> dict:
    """LLaMA, Mistral, Qwen2 and Qwen3: one trunk; what differs is which biases exist,
    q/k norms, and which config keys spell them."""
    get, kind = c.get, c.get("model_type", "llama")
    require(get("hidden_act", "silu") == "silu", where, f"hidden_act {get('hidden_act')!r} (expected 'silu')")
    rope = dict(get("rope_parameters") or get("rope_scaling") or {})
    theta = rope.pop("rope_theta", get("rope_theta", 10000.0))
    kind_of_rope = rope.pop("rope_type", rope.pop("type", "default"))
    require(rope.pop("partial_rotary_factor", 1.0) == 1.0, where, "partial_rotary_factor != 1 is not supported")
    supported = ("default", "linear", "dynamic", "llama3", "yarn")
    require(kind_of_rope in supported, where, f"rope scaling {kind_of_rope!r} is not supported ({supported})")
    scaling = None if kind_of_rope == "default" else {"rope_type": kind_of_rope, **rope}
    if kind_of_rope == "dynamic":  # transformers scales against max_position_embeddings
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


def llama_kind(cfg: ModelConfig) -> str:
    """The Hugging Face model type a llama-family config exports as: q/k norms make it Qwen3,
    q/k/v biases without others Qwen2, anything else LLaMA."""
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.attn_bias and not cfg.bias else "llama"


def export_architecture(cfg: ModelConfig, arch: str) -> str:
    """`arch` (named for LLaMA by the task) renamed for the model type `cfg` needs."""
    if cfg.family != "llama":
        return arch
    return arch.replace("Llama", LLAMA_LIKE[llama_kind(cfg)], 1)


def special_tokens(cfg: ModelConfig) -> dict:
    """bos/eos/pad ids as config.json and generation_config.json spell them (eos an int or a list)."""
    eos = cfg.eos_token_id
    return dict(bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id)


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    """config.json for `cfg` as `transformers` writes it for `arch`."""
    out: dict = {"architectures": [arch], "model_type": MODEL_TYPE[cfg.family], "initializer_range": cfg.init_std}
    if cfg.family == "gpt":
        out.update(
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
    elif cfg.family == "llama":
        kind = llama_kind(cfg)
        out.update(
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
            model_type=kind,
        )
        if kind != "llama":
            out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            intermediate_size=cfg.d_ff,
            hidden_act="gelu" if cfg.mlp == "gelu" else "gelu_pytorch_tanh",
            layer_norm_eps=cfg.norm_eps,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.attention_dropout,
        )
        if cfg.family == "bert":
            out.update(
                vocab_size=cfg.vocab_size,
                max_position_embeddings=cfg.max_seq_len,
                type_vocab_size=cfg.type_vocab_size,
                position_embedding_type="absolute",
            )
        else:
            out.update(
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                num_channels=cfg.num_channels,
                encoder_stride=cfg.patch_size,
                qkv_bias=True,
            )
    if cfg.family != "vit":
        out.update(special_tokens(cfg))
    return out


def check_exportable(cfg: ModelConfig, arch: str) -> None:
    """Raise a UserError naming the first field of `cfg` that `arch` cannot express."""
    expected = {
        "gpt": dict(norm="layernorm", norm_position="pre", position="learned", bias=True, causal=True),
        "llama": dict(norm="rmsnorm", norm_position="pre", position="rotary", mlp="swiglu", causal=True),
        "bert": dict(norm="layernorm", norm_position="post", position="learned", bias=True, tie_embeddings=True),
        "vit": dict(norm="layernorm", norm_position="pre", bias=True, causal=False),
    }[cfg.family]
    if cfg.family == "bert" and cfg.type_vocab_size == 0:
        raise UserError("model.type_vocab_size: a BERT export needs token-type embeddings (got 0)")
    if cfg.rope_scaling is not None and cfg.family != "llama":
        raise UserError(f"model.rope_scaling: {arch} has no rotary positions")
    if cfg.qk_norm and (cfg.family != "llama" or cfg.attn_bias or cfg.bias):
        raise UserError("model.qk_norm: only Qwen3 has q/k norms, and it has no biases (set bias: false)")
    if cfg.qkv_bias is not None and cfg.qkv_bias != cfg.bias and not (cfg.family == "llama" and not cfg.bias):
        raise UserError(f"model.qkv_bias: {arch} cannot have q/k/v biases differ from the others' ({cfg.bias})")
    if cfg.family in ("gpt", "bert", "vit") and cfg.mlp == "swiglu":
        raise UserError(f"model.mlp: 'swiglu' has no {arch} equivalent (expected gelu or gelu_tanh)")
    for name, value in expected.items():
        if getattr(cfg, name) != value:
            raise UserError(f"model.{name}: {arch} needs {value!r}, got {getattr(cfg, name)!r}")


# ----------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------


def read_hf_config(path: Path, name: str = "config.json") -> dict:
    """A JSON object file of a Hugging Face directory (config.json, generation_config.json)."""
    file = path / name
    if not file.is_file():
        raise UserError(f"{file}: not found (a Hugging Face model directory holds config.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a JSON object")
    return config


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory: model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    single, index, pickle = (
        path / "model.safetensors",
        path / "model.safetensors.index.json",
        path / "pytorch_model.bin",
    )
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(load_file(str(path / shard)))
            return tensors
        if pickle.is_file():
            return torch.load(pickle, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, json and unpickling each raise their own types
        raise UserError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
    raise UserError(f"{path}: no weights found (expected model.safetensors, its index, or pytorch_model.bin)")


def copy_tokenizer(tokenizer, path: Path) -> None:
    """Copy a tokenizer.json (a path, or a `llm.data.tokenizer.Tokenizer`) into directory `path`."""
    source = Path(getattr(tokenizer, "path", tokenizer))
    if source.is_dir():
        source = source / "tokenizer.json"
    if not source.is_file():
        raise UserError(f"{source}: tokenizer file not found")
    target = path / "tokenizer.json"
    if source.resolve() != target.resolve():
        from llm.fileio import write_atomic

        write_atomic(target, source.read_bytes())
