"""Hugging Face interop: read and write `transformers` directories (config.json + safetensors).

Each supported architecture maps its config to a `ModelConfig` and its weights
to ours through one list of rules per family; the same rules run backwards on
export, so HF -> llm -> HF reproduces every tensor bit for bit. Nothing here
imports `transformers`: config.json is plain JSON and the weights are safetensors
(or a pytorch_model.bin read with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.config import ConfigError, ModelConfig, build_config
from llm.errors import UserError
from llm.models.heads import Model

# architecture -> (family, task). The task picks our head; the family the mapping rules.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "GPT2LMHeadModel": ("gpt", "causal_lm"),
    "GPT2Model": ("gpt", "encoder"),
    "LlamaForCausalLM": ("llama", "causal_lm"),
    "LlamaModel": ("llama", "encoder"),
    "BertForPreTraining": ("bert", "pretraining"),
    "BertForMaskedLM": ("bert", "masked_lm"),
    "BertModel": ("bert", "encoder"),
    "ViTModel": ("vit", "encoder"),
    "ViTForImageClassification": ("vit", "image_classification"),
    "ViTForMaskedImageModeling": ("vit", "masked_image_modeling"),
}
EXPORT_ARCHITECTURE = {v: k for k, v in ARCHITECTURES.items()}
MODEL_TYPE = {"gpt": "gpt2", "llama": "llama", "bert": "bert", "vit": "vit"}
DEFAULT_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertModel", "vit": "ViTModel"}
# Where the trunk sits inside a head model's state dict (GPT2LMHeadModel: "transformer.h.0...").
BASE_PREFIX = {"gpt": "transformer.", "llama": "model.", "bert": "bert.", "vit": "vit."}
# Buffers and tied duplicates that some checkpoints carry and nothing needs.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq")
IGNORED_KEYS = ("lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

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


def _linear(ours: str, theirs: str, bias: bool = True, op: str = "copy", base: bool = True) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", (f"{theirs}.weight",), op, base)]
    if bias:
        rules.append(Rule(f"{ours}.bias", (f"{theirs}.bias",), "copy", base))
    return rules


def _fused(ours: str, theirs: list[str], bias: bool) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), "cat")]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), "cat"))
    return rules


def _rules(cfg: ModelConfig) -> list[Rule]:
    """Every tensor of the model for `cfg` and where it lives in a Hugging Face state dict."""
    t, rules = "transformer", []
    for i in range(cfg.n_layers):
        b = f"{t}.blocks.{i}"
        if cfg.family == "gpt":
            h = f"h.{i}"
            rules += _linear(f"{b}.attn_norm", f"{h}.ln_1") + _linear(f"{b}.mlp_norm", f"{h}.ln_2")
            rules += _linear(f"{b}.attn.qkv", f"{h}.attn.c_attn", op="t")
            rules += _linear(f"{b}.attn.proj", f"{h}.attn.c_proj", op="t")
            rules += _linear(f"{b}.mlp.fc_in", f"{h}.mlp.c_fc", op="t")
            rules += _linear(f"{b}.mlp.fc_out", f"{h}.mlp.c_proj", op="t")
        elif cfg.family == "llama":
            h, bias = f"layers.{i}", cfg.bias
            rules += _linear(f"{b}.attn_norm", f"{h}.input_layernorm", bias=False)
            rules += _linear(f"{b}.mlp_norm", f"{h}.post_attention_layernorm", bias=False)
            rules += _fused(f"{b}.attn.qkv", [f"{h}.self_attn.{p}_proj" for p in "qkv"], bias)
            rules += _linear(f"{b}.attn.proj", f"{h}.self_attn.o_proj", bias=bias)
            rules += _fused(f"{b}.mlp.fc_in", [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"], bias)
            rules += _linear(f"{b}.mlp.fc_out", f"{h}.mlp.down_proj", bias=bias)
        else:  # bert and vit share the encoder layout
            h = f"encoder.layer.{i}"
            qkv = "attention.self" if cfg.family == "bert" else "attention.attention"
            rules += _fused(f"{b}.attn.qkv", [f"{h}.{qkv}.{p}" for p in ("query", "key", "value")], True)
            rules += _linear(f"{b}.attn.proj", f"{h}.attention.output.dense")
            rules += _linear(f"{b}.mlp.fc_in", f"{h}.intermediate.dense")
            rules += _linear(f"{b}.mlp.fc_out", f"{h}.output.dense")
            if cfg.family == "bert":
                rules += _linear(f"{b}.attn_norm", f"{h}.attention.output.LayerNorm")
                rules += _linear(f"{b}.mlp_norm", f"{h}.output.LayerNorm")
            else:
                rules += _linear(f"{b}.attn_norm", f"{h}.layernorm_before")
                rules += _linear(f"{b}.mlp_norm", f"{h}.layernorm_after")

    if cfg.family == "gpt":
        rules += [Rule(f"{t}.tok_embed.weight", ("wte.weight",)), Rule(f"{t}.pos_embed.weight", ("wpe.weight",))]
        rules += _linear(f"{t}.norm", "ln_f")
    elif cfg.family == "llama":
        rules += [Rule(f"{t}.tok_embed.weight", ("embed_tokens.weight",))]
        rules += _linear(f"{t}.norm", "norm", bias=False)
    elif cfg.family == "bert":
        e = "embeddings"
        rules += [
            Rule(f"{t}.tok_embed.weight", (f"{e}.word_embeddings.weight",)),
            Rule(f"{t}.pos_embed.weight", (f"{e}.position_embeddings.weight",)),
            Rule(f"{t}.type_embed.weight", (f"{e}.token_type_embeddings.weight",)),
        ]
        rules += _linear(f"{t}.embed_norm", f"{e}.LayerNorm")
    else:
        e = "embeddings"
        rules += [
            Rule(f"{t}.cls_token", (f"{e}.cls_token",)),
            Rule(f"{t}.pos_embed", (f"{e}.position_embeddings",)),
        ]
        rules += _linear(f"{t}.patch_embed", f"{e}.patch_embeddings.projection")
        rules += _linear(f"{t}.norm", "layernorm")
        if cfg.task == "masked_image_modeling":
            rules += [Rule(f"{t}.mask_token", (f"{e}.mask_token",))]

    # heads
    if cfg.pooler:  # BERT's pooler sits inside the trunk ("bert.pooler"), ViT's only in ViTModel
        rules += _linear("pooler.dense", "pooler.dense")
    if cfg.task == "causal_lm" and not cfg.tie_embeddings:
        rules += _linear("lm_head", "lm_head", bias=False, base=False)
    if cfg.task in ("pretraining", "masked_lm"):
        p = "cls.predictions"
        rules += _linear("mlm.dense", f"{p}.transform.dense", base=False)
        rules += _linear("mlm.norm", f"{p}.transform.LayerNorm", base=False)
        rules += [Rule("mlm.decoder.bias", (f"{p}.bias",), base=False)]
    if cfg.task == "pretraining":
        rules += _linear("nsp", "cls.seq_relationship", base=False)
    if cfg.task == "image_classification":
        rules += _linear("classifier", "classifier", base=False)
    if cfg.task == "masked_image_modeling":
        rules += _linear("decoder", "decoder.0", op="conv1x1", base=False)
    return rules


def _to_ours(rule: Rule, tensors: list[torch.Tensor]) -> torch.Tensor:
    if rule.op == "t":
        return tensors[0].t()
    if rule.op == "cat":
        return torch.cat(tensors, dim=0)
    if rule.op == "conv1x1":
        return tensors[0].flatten(1) if tensors[0].dim() == 4 else tensors[0]
    return tensors[0]


def _to_theirs(rule: Rule, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
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


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise UserError(f"{where}: {message}")


def _config_from_hf(c: dict, family: str, task: str, arch: str, where: str) -> dict:
    """Our ModelConfig fields (a dict, validated later) for a Hugging Face config.json."""
    get = c.get
    common = dict(family=family, task=task, init_std=get("initializer_range", 0.02))
    if family == "gpt":
        _require(get("scale_attn_weights", True), where, "scale_attn_weights=false is not supported")
        _require(not get("scale_attn_by_inverse_layer_idx", False), where, "scale_attn_by_inverse_layer_idx")
        _require(not get("add_cross_attention", False), where, "cross-attention is not supported")
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
        _require(get("hidden_act", "silu") == "silu", where, f"hidden_act {get('hidden_act')!r} (expected 'silu')")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        _require(
            rope.get("rope_type", rope.get("type", "default")) == "default",
            where,
            f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported (only default rotary)",
        )
        bias = get("attention_bias", False)
        _require(bias == get("mlp_bias", False), where, "attention_bias and mlp_bias must be equal")
        d, heads = get("hidden_size", 4096), get("num_attention_heads", 32)
        head_dim = get("head_dim") or d // heads
        _require(head_dim * heads == d, where, f"head_dim={head_dim} * heads={heads} != hidden_size={d}")
        return dict(
            common,
            vocab_size=get("vocab_size", 32000),
            max_seq_len=get("max_position_embeddings", 2048),
            d_model=d,
            n_layers=get("num_hidden_layers", 32),
            n_heads=heads,
            n_kv_heads=get("num_key_value_heads") or heads,
            d_ff=get("intermediate_size", 11008),
            norm="rmsnorm",
            norm_position="pre",
            norm_eps=get("rms_norm_eps", 1e-6),
            position="rotary",
            rope_theta=rope.get("rope_theta", get("rope_theta", 10000.0)),
            mlp="swiglu",
            bias=bias,
            dropout=0.0,
            attention_dropout=get("attention_dropout", 0.0),
            tie_embeddings=get("tie_word_embeddings", False),
            causal=True,
        )
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
        _require(
            get("position_embedding_type", "absolute") == "absolute",
            where,
            f"position_embedding_type {get('position_embedding_type')!r} (expected 'absolute')",
        )
        _require(not get("is_decoder", False), where, "BERT as a decoder is not supported")
        _require(get("tie_word_embeddings", True), where, "an MLM decoder untied from the embeddings")
        return dict(
            encoder,
            vocab_size=get("vocab_size", 30522),
            max_seq_len=get("max_position_embeddings", 512),
            norm_position="post",
            type_vocab_size=get("type_vocab_size", 2),
            pooler=arch in ("BertModel", "BertForPreTraining") or task in ("pretraining", "sequence_classification"),
            tie_embeddings=True,
            num_labels=len(get("id2label") or {}) or get("num_labels", 2),
        )
    _require(get("qkv_bias", True), where, "qkv_bias=false is not supported")
    _require(get("pooler_act", "tanh") == "tanh", where, f"pooler_act {get('pooler_act')!r} (expected 'tanh')")
    d, patch = encoder["d_model"], get("patch_size", 16)
    _require(get("pooler_output_size") in (None, d), where, "pooler_output_size must equal hidden_size")
    if task == "masked_image_modeling":
        _require(get("encoder_stride", 16) == patch, where, "encoder_stride must equal patch_size")
    return dict(
        encoder,
        norm_position="pre",
        image_size=get("image_size", 224),
        patch_size=patch,
        num_channels=get("num_channels", 3),
        pooler=arch == "ViTModel" and task == "encoder",
        tie_embeddings=False,
        num_labels=len(get("id2label") or {}) or get("num_labels", 2),
    )


def _config_to_hf(cfg: ModelConfig, arch: str) -> dict:
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
            bos_token_id=cfg.eos_token_id,
        )
    elif cfg.family == "llama":
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
            rope_theta=cfg.rope_theta,  # transformers 4.x reads this, 5.x the dict below
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            attention_bias=cfg.bias,
            mlp_bias=cfg.bias,
            attention_dropout=cfg.attention_dropout,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=None,
        )
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
        if cfg.task in ("image_classification", "sequence_classification"):
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    if cfg.family != "vit":
        out.update(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    return out


def _check_exportable(cfg: ModelConfig) -> str:
    """The Hugging Face architecture for `cfg`, or a UserError naming the field that has none."""
    arch = EXPORT_ARCHITECTURE.get((cfg.family, cfg.task))
    if arch is None:
        tasks = sorted(t for f, t in EXPORT_ARCHITECTURE if f == cfg.family)
        raise UserError(f"model.task: {cfg.task!r} of family {cfg.family!r} has no Hugging Face export (has: {tasks})")
    expected = {
        "gpt": dict(norm="layernorm", norm_position="pre", position="learned", bias=True, causal=True),
        "llama": dict(norm="rmsnorm", norm_position="pre", position="rotary", mlp="swiglu", causal=True),
        "bert": dict(norm="layernorm", norm_position="post", position="learned", bias=True, tie_embeddings=True),
        "vit": dict(norm="layernorm", norm_position="pre", bias=True, causal=False),
    }[cfg.family]
    if cfg.family == "bert" and cfg.type_vocab_size == 0:
        raise UserError("model.type_vocab_size: a BERT export needs token-type embeddings (got 0)")
    if cfg.family in ("gpt", "bert", "vit") and cfg.mlp == "swiglu":
        raise UserError(f"model.mlp: 'swiglu' has no {arch} equivalent (expected gelu or gelu_tanh)")
    for name, value in expected.items():
        if getattr(cfg, name) != value:
            raise UserError(f"model.{name}: {arch} needs {value!r}, got {getattr(cfg, name)!r}")
    return arch


# ----------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------


def read_hf_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise UserError(f"{file}: not found (a Hugging Face model directory holds config.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a JSON object")
    return config


def _architecture(config: dict, file: Path) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else DEFAULT_ARCHITECTURE.get(config.get("model_type", ""))
    if arch is None:
        raise UserError(f"{file}: model_type {config.get('model_type')!r} is not supported")
    if arch not in ARCHITECTURES:
        raise UserError(f"{file}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


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


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """State-dict names that share a tensor with an earlier name (tied embeddings)."""
    seen, aliases = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return aliases


def from_hf(path: str | Path, task: str | None = None) -> Model:
    """A model with the weights of a Hugging Face directory.

    `task` builds a different head on the same trunk (e.g. "sequence_classification"
    from a BertModel): the trunk must be complete, missing head weights are freshly
    initialised and unused ones dropped. Without it every tensor must match.
    """
    from llm.models import build_model

    path = Path(path)
    config = read_hf_config(path)
    file = path / "config.json"
    arch = _architecture(config, file)
    family, arch_task = ARCHITECTURES[arch]
    fields = _config_from_hf(config, family, task or arch_task, arch, str(file))
    for name in ("eos_token_id", "pad_token_id"):
        value = config.get(name)
        if isinstance(value, list):  # some configs list several EOS ids; the first is the one we stop at
            value = value[0] if value else None
        if family != "vit" and isinstance(value, int) and 0 <= value < fields["vocab_size"]:
            fields[name] = value
    if family in ("gpt", "llama"):
        fields["pooling"] = "last"  # a causal model summarises a sequence in its last token
    try:
        cfg = build_config(ModelConfig, fields, "model")
    except ConfigError as e:
        raise UserError(f"{file}: {e}") from None
    model = build_model(cfg)

    prefix = BASE_PREFIX[family]
    hf = {}
    for key, tensor in read_hf_weights(path).items():
        key = (
            key.removeprefix(prefix)
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias")
        )
        hf[key] = tensor
    lenient = task is not None and task != arch_task
    ours, used, missing = {}, set(), []
    for rule in _rules(cfg):
        if all(t in hf for t in rule.theirs):
            ours[rule.ours] = _to_ours(rule, [hf[t] for t in rule.theirs])
            used.update(rule.theirs)
        else:
            missing.append(rule)
    bad_missing = [r for r in missing if not lenient or r.ours.startswith("transformer.")]
    if bad_missing:
        names = [t for r in bad_missing[:4] for t in r.theirs if t not in hf]
        raise UserError(f"{path}: weights for {arch} lack {', '.join(names)} ({len(bad_missing)} tensors missing)")
    unused = [k for k in hf if k not in used and not k.endswith(IGNORED_SUFFIXES) and k not in IGNORED_KEYS]
    if unused and not lenient:
        raise UserError(f"{path}: {len(unused)} tensors that {arch} does not have, e.g. {', '.join(unused[:4])}")
    expected = model.state_dict()
    for name, tensor in ours.items():
        target = expected[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise UserError(
                f"{path}: tensor for {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(target.shape)}"
            )
    result = model.load_state_dict(ours, strict=False)
    leftover = set(result.missing_keys) - tied_aliases(model) - {r.ours for r in missing}
    if lenient:  # a head that the source architecture lacks keeps its fresh initialisation
        leftover = {k for k in leftover if k.startswith("transformer.")}
    assert not leftover and not result.unexpected_keys, (leftover, result.unexpected_keys)
    return model


def hf_state_dict(model: Model) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture, state dict with Hugging Face names) for `model`; tied tensors appear once."""
    cfg = model.config
    arch = _check_exportable(cfg)
    prefix = "" if cfg.task == "encoder" else BASE_PREFIX[cfg.family]  # head models nest the trunk
    ours = model.state_dict()
    out = {}
    for rule in _rules(cfg):
        for name, tensor in zip(rule.theirs, _to_theirs(rule, ours[rule.ours], cfg)):
            out[(prefix if rule.base else "") + name] = tensor.detach().to("cpu").contiguous().clone()
    return arch, out


def to_hf(model: Model, path: str | Path, tokenizer: str | Path | None = None) -> None:
    """Write config.json + model.safetensors that `transformers` loads with from_pretrained;
    copy `tokenizer` (a tokenizer.json) beside them when given."""
    from safetensors.torch import save_file

    path = Path(path)
    arch, tensors = hf_state_dict(model)
    config = _config_to_hf(model.config, arch)
    dtype = next(model.parameters()).dtype
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        copy_tokenizer(tokenizer, path)


def copy_tokenizer(tokenizer, path: Path) -> None:
    """Copy a tokenizer.json (a path, or a `llm.data.tokenizer.Tokenizer`) into directory `path`."""
    source = Path(getattr(tokenizer, "path", tokenizer))
    if source.is_dir():
        source = source / "tokenizer.json"
    if not source.is_file():
        raise UserError(f"{source}: tokenizer file not found")
    target = path / "tokenizer.json"
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
