"""`--to gguf`: one GGUF file (model.gguf) that llama.cpp runs, its tokenizer inside.

Causal LMs of two families, as llama.cpp names its architectures: GPT-2 (`gpt2`) and the LLaMA
family (`llama` for LLaMA and Mistral, `qwen2` for q/k/v biases without others, `qwen3` for q/k
norms). Tensor names, layouts and metadata keys follow llama.cpp's convert_hf_to_gguf.py (the names
come from the `gguf` package's own tables):
- our fused q/k/v projection is llama.cpp's `attn_qkv` for GPT-2 and separate `attn_q/k/v` for the
  LLaMA family; our fused SwiGLU input is `ffn_gate` then `ffn_up` (gate first);
- llama.cpp's `llama` architecture rotates adjacent pairs (GPT-J style) where Hugging Face and llm
  pair dimension i with i + head_dim/2, so the rows of q and k are permuted within each head
  (`LlamaModel.permute` in convert_hf_to_gguf.py); `qwen2`/`qwen3` rotate as we do (NeoX style);
- Llama 3's rope scaling is llama.cpp's `rope_freqs` tensor: per frequency, the plain inverse
  frequency over the scaled one (llama.cpp divides each angle by it);
- a tied LM head is left out: llama.cpp then reads the token embedding as the output matrix.

Tensor types (`--gguf-type`): norms, biases, 1-D tensors and GPT-2's position table stay f32, as
convert_hf_to_gguf.py keeps them; every other matrix is f32, f16, Q8_0 or Q4_0, quantized by the
`gguf` package's own numpy quantizers (bit-exact with ggml's reference), and f16 where a row is not
a whole number of 32-value blocks. A model quantized by llm is written as it is where GGUF holds it
exactly: int4 symmetric with one fp16 scale per 32 inputs is Q4_0 (d = scale, stored nibble q + 8).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm.errors import UserError
from llm.models import hf
from llm.models.base import Model
from llm.models.config import ModelConfig
from llm.models.rope import rope_frequencies
from llm.run.formats import require

FILE = "model.gguf"
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
CAUSAL_TASKS = ("causal_lm", "instruction")
KEPT_TRANSFORMS = ("freeze", "quantize", "prune")  # what llama.cpp can hold: nothing, exact Q4_0, smaller shapes
ROPE_SCALINGS = ("linear", "llama3")
Q_BLOCK = 32  # values per Q8_0 / Q4_0 block, each with one fp16 scale
# a tokenizer's kind (`tokenizer_kind`) -> llama.cpp's tokenizer model and pre-tokenizer names
LLAMA_CPP_TOKENIZERS = {"byte-level": ("gpt2", "gpt-2"), "sentencepiece": ("llama", "default")}


def layout(model: Model) -> hf.GGUFLayout:
    """llama.cpp's architecture for `model` and how it holds it (its family adapter says); UserError naming
    what it cannot hold."""
    return hf.family_adapter(model.config.family).gguf_layout(model.config)


def check(model: Model) -> str | None:
    """Why llama.cpp cannot run `model` as llm does, else None."""
    cfg = model.config
    if model.task not in CAUSAL_TASKS:
        return f"llama.cpp runs causal LMs, not task {model.task!r}"
    for t in model.transforms:
        if t["name"] not in KEPT_TRANSFORMS:
            return f"llama.cpp cannot hold the model's {t['name']!r} transform (merge or remove it first)"
        if t["name"] == "quantize" and (reason := _quantized_reason(t)):
            return reason
    try:
        arch = layout(model)
    except UserError as e:
        return str(e)
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind is not None and kind not in ROPE_SCALINGS:
        return f"model.rope_scaling: llm writes {' and '.join(ROPE_SCALINGS)} scaling for llama.cpp, not {kind!r}"
    shapes = {(b.attn.n_heads, b.attn.kv_heads) for b in model.transformer.blocks}
    if len(shapes) > 1:
        return f"llama.cpp needs every layer with the same heads, got (heads, kv heads) {sorted(shapes)}"
    heads = shapes.pop()[0]
    if arch.full_heads and heads * cfg.head_dim != cfg.d_model:
        return f"llama.cpp's {arch.arch} needs n_heads * head_dim == d_model; structured pruning left {heads} heads"
    return None


def _quantized_reason(record: dict) -> str | None:
    if record.get("method") != "int4":
        return (
            f"llm's {record.get('method')} quantization keeps one fp32 scale per output channel, GGUF's Q8_0 one "
            "fp16 scale per 32 weights, so no GGUF type holds it exactly: convert the unquantized model with "
            "--gguf-type q8_0"
        )
    if record.get("group_size") != Q_BLOCK:
        return (
            f"llm's int4 with group_size {record.get('group_size')} has no exact GGUF type (Q4_0 is int4 with one "
            f"fp16 scale per {Q_BLOCK} weights): quantize with group_size {Q_BLOCK} or convert the unquantized model"
        )
    return None


@dataclass(frozen=True)
class Int4:
    """An llm int4 weight: q int8 (N, K) in [-8, 7] and one fp16 scale per 32 inputs (N, K / 32); w = q * scale."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def rows(self, fn) -> Int4:
        """The same rows re-ordered or picked by `fn` (applied to q and the scales alike)."""
        return Int4(fn(self.q), fn(self.scale))


def _split(w: torch.Tensor | Int4, sizes: list[int]) -> list:
    """The row blocks of `w` of the given sizes (a fused q/k/v or gate/up matrix taken apart)."""
    if isinstance(w, Int4):
        return [Int4(q, s) for q, s in zip(w.q.split(sizes), w.scale.split(sizes))]
    return list(w.split(sizes))


def _permute(w: torch.Tensor | Int4, heads: int) -> torch.Tensor | Int4:
    """Rows of q or k (weight or bias) from half-split rotary pairs (i, i + d/2) to adjacent ones (2i, 2i + 1),
    per head: llama.cpp's `llama` rotation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    if isinstance(w, Int4):
        return w.rows(lambda t: _permute(t, heads))
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weights(model: Model) -> dict[str, torch.Tensor | Int4]:
    """The model's tensors by state-dict name, an int4-quantized weight as `Int4`
    (read through `llm.transforms.plain_state`: W.qdata packed, W.scale, W.zero_point)."""
    from llm.compress.quantize import unpack_int4
    from llm.transforms import plain_state

    state = plain_state(model)
    out = {}
    for name, t in state.items():
        base, _, part = name.rpartition(".")
        if part == "qdata":
            if bool(state[f"{base}.zero_point"].any()):
                raise UserError(f"{base}: a nonzero zero point has no Q4_0 form (Q4_0 is symmetric)")
            out[base] = Int4(unpack_int4(t), state[f"{base}.scale"])
        elif part not in ("scale", "zero_point"):
            out[name] = t.float()
    return out


def gguf_tensors(model: Model) -> dict[str, torch.Tensor | Int4]:
    """llama.cpp's tensors of `model` by GGUF name, in llama.cpp's layouts (see the module docstring)."""
    import gguf

    arch, cfg, w = layout(model), model.config, _weights(model)
    names = gguf.TENSOR_NAMES
    t = gguf.MODEL_TENSOR

    def name(kind, suffix="weight", block=None) -> str:
        return f"{names[kind].format(bid=block)}.{suffix}"

    out = {name(t.TOKEN_EMBD): w["transformer.tok_embed.weight"]}
    if "transformer.pos_embed.weight" in w:  # learned positions (GPT-2)
        out[name(t.POS_EMBD)] = w["transformer.pos_embed.weight"]
    for suffix in ("weight", "bias"):
        if f"transformer.norm.{suffix}" in w:
            out[name(t.OUTPUT_NORM, suffix)] = w[f"transformer.norm.{suffix}"]
    if "lm_head.weight" in w:  # absent when tied to the token embedding
        out[name(t.OUTPUT)] = w["lm_head.weight"]
    for i, block in enumerate(model.transformer.blocks):
        ours = f"transformer.blocks.{i}"
        attn, q_rows = block.attn, block.attn.n_heads * block.attn.head_dim
        kv_rows = attn.kv_heads * attn.head_dim
        for suffix in ("weight", "bias"):
            parts = {
                t.ATTN_NORM: f"{ours}.attn_norm",
                t.FFN_NORM: f"{ours}.mlp_norm",
                t.ATTN_OUT: f"{ours}.attn.proj",
                t.FFN_DOWN: f"{ours}.mlp.fc_out",
                t.ATTN_Q_NORM: f"{ours}.attn.q_norm",
                t.ATTN_K_NORM: f"{ours}.attn.k_norm",
            }
            for kind, layer in parts.items():
                if f"{layer}.{suffix}" in w:
                    out[name(kind, suffix, i)] = w[f"{layer}.{suffix}"]
            qkv, fc_in = w.get(f"{ours}.attn.qkv.{suffix}"), w.get(f"{ours}.mlp.fc_in.{suffix}")
            if qkv is not None and arch.fused_qkv:
                out[name(t.ATTN_QKV, suffix, i)] = qkv
            elif qkv is not None:
                q, k, v = _split(qkv, [q_rows, kv_rows, kv_rows])
                if arch.adjacent_rotary:
                    q, k = _permute(q, attn.n_heads), _permute(k, attn.kv_heads)
                out.update({name(t.ATTN_Q, suffix, i): q, name(t.ATTN_K, suffix, i): k, name(t.ATTN_V, suffix, i): v})
            if fc_in is not None and cfg.mlp == "swiglu":
                gate, up = _split(fc_in, [fc_in.shape[0] // 2] * 2)
                out.update({name(t.FFN_GATE, suffix, i): gate, name(t.FFN_UP, suffix, i): up})
            elif fc_in is not None:
                out[name(t.FFN_UP, suffix, i)] = fc_in
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        plain = rope_frequencies(cfg.head_dim, cfg.rope_theta, None, cfg.max_seq_len)[0]
        scaled = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)[0]
        out[name(t.ROPE_FREQS)] = plain / scaled
    return out


def _tensor_type(gguf_name: str, tensor: torch.Tensor | Int4, gguf_type: str):
    """The GGML type of one tensor: Q4_0 for an llm int4 weight; f32 for norms, biases, 1-D tensors and
    position tables; else `gguf_type`, f16 where a row is not whole blocks (convert_hf_to_gguf.py's rules)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if isinstance(tensor, Int4):
        return types.Q4_0
    kept = gguf_name.endswith(("_norm.weight", ".bias")) or gguf_name.startswith(("position_embd", "rope_freqs"))
    if tensor.dim() <= 1 or kept or gguf_type == "f32":
        return types.F32
    if gguf_type == "f16" or tensor.shape[-1] % Q_BLOCK:
        return types.F16
    return types[gguf_type.upper()]


def q4_0_blocks(w: Int4) -> np.ndarray:
    """Q4_0 blocks of an llm int4 weight (N, K) -> uint8 (N, K / 32 * 18): per block of 32 inputs the fp16
    scale d, then 16 bytes whose low nibbles hold values 0..15 and high nibbles values 16..31, each stored as
    q + 8 (ggml's block_q4_0; gguf.quants.Q4_0 reads it back as d * (nibble - 8))."""
    n, k = w.q.shape
    nibbles = (w.q.reshape(n, k // Q_BLOCK, Q_BLOCK).to(torch.int16) + 8).to(torch.uint8)
    packed = nibbles[..., : Q_BLOCK // 2] | (nibbles[..., Q_BLOCK // 2 :] << 4)
    d = w.scale.to(torch.float16).reshape(n, k // Q_BLOCK, 1).view(torch.uint8)  # 2 bytes, little-endian
    return np.ascontiguousarray(torch.cat((d, packed), dim=-1).reshape(n, -1).numpy())


def write(model: Model, out_dir: Path, tokenizer: Path | None = None, *, gguf_type: str | None = None) -> None:
    """`gguf_type`: f32 (default for a float model), f16, q8_0 or q4_0; an llm int4 model is written as
    q4_0, exactly, and takes no other. Raises UserError without a tokenizer (llama.cpp tokenizes with it)."""
    gguf = require("gguf")
    quantized = any(t["name"] == "quantize" for t in model.transforms)
    if gguf_type is None:
        gguf_type = "q4_0" if quantized else "f32"
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type: expected one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if quantized and gguf_type != "q4_0":
        raise UserError(
            f"--gguf-type {gguf_type}: the model is llm int4 (group 32), which GGUF holds exactly as q4_0; "
            "leave --gguf-type out, or convert the unquantized model"
        )
    if tokenizer is None:
        raise UserError("--to gguf needs the model's tokenizer.json beside it (llama.cpp tokenizes with it)")
    cfg = model.config
    writer = gguf.GGUFWriter(Path(out_dir) / FILE, layout(model).arch)
    tensors = gguf_tensors(model)
    d_ff = tensors[f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_DOWN].format(bid=0)}.weight"].shape[1]
    _add_hyperparameters(writer, model, d_ff)
    add_tokenizer(writer, tokenizer, cfg)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    writer.add_file_type(gguf.LlamaFileType[file_types[gguf_type]])
    for gguf_name, tensor in tensors.items():
        kind = _tensor_type(gguf_name, tensor, gguf_type)
        if isinstance(tensor, Int4):
            data = q4_0_blocks(tensor)
        else:
            data = gguf.quants.quantize(tensor.contiguous().numpy(), kind)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hyperparameters(writer, model: Model, d_ff: int) -> None:
    """The `{arch}.*` keys llama.cpp reads (convert_hf_to_gguf.py's set_gguf_parameters), heads and `d_ff`
    as the layers have them, so that a structurally pruned model is described as it is."""
    import gguf

    cfg, attn = model.config, model.transformer.blocks[0].attn
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(d_ff)
    writer.add_head_count(attn.n_heads)
    writer.add_head_count_kv(attn.kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if cfg.norm == "layernorm":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.position == "rotary":
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
    if (cfg.rope_scaling or {}).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def tokenizer_kind(spec: dict) -> str | None:
    """The kind of a tokenizer.json (parsed) that llama.cpp reads: "byte-level" BPE with GPT-2's
    pre-tokenizer (what `llm data tokenizer` trains, GPT-2's own), "sentencepiece" style BPE (byte
    fallback, words marked by a leading "▁": LLaMA 1/2, Mistral, TinyLlama); None for any other."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    normalizer = spec.get("normalizer") or {}
    if model.get("type") != "BPE":
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "byte-level" if not normalizer else None
    if not model.get("byte_fallback"):
        return None
    metaspace = pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" and not pre.get("split", True)
    metaspace = metaspace and pre.get("prepend_scheme", "always") in ("first", "always") and not normalizer
    steps = [(n.get("type"), n.get("prepend") or n.get("content")) for n in normalizer.get("normalizers", [])]
    prepend_replace = not pre and steps == [("Prepend", "▁"), ("Replace", "▁")]
    return "sentencepiece" if metaspace or prepend_replace else None


def add_tokenizer(writer, path: Path, cfg: ModelConfig) -> None:
    """The tokenizer.ggml.* keys, as convert_hf_to_gguf.py writes them (_set_vocab_gpt2, _set_vocab_llama_hf):
    one token per id of the model's vocabulary, spelt as tokenizer.json spells it (ids it lacks are
    "[PAD{id}]", type UNUSED); added special tokens CONTROL, other added tokens USER_DEFINED, "<0xXX>" BYTE;
    the special ids of the model config (else the tokenizer's); add_bos_token as the tokenizer's own
    post-processor does. Byte-level BPE is llama.cpp's "gpt2" model with the merges; SentencePiece-style BPE
    its "llama" model with a score per token instead, which llama.cpp's SentencePiece merging maximises:
    minus the rank of the first merge that makes the token, so that it merges in BPE's order (0 for tokens no
    merge makes).

    Raises UserError naming the file for a tokenizer that llama.cpp would split otherwise (`tokenizer_kind`),
    or one with more ids than the model's vocabulary."""
    import gguf

    from llm.data.tokenizer import Tokenizer

    tok = Tokenizer(path)
    spec = json.loads(tok.path.read_text(encoding="utf-8"))
    kind = tokenizer_kind(spec)
    if kind is None:
        got = ", ".join(
            f"{part} {(spec.get(part) or {}).get('type')!r}" for part in ("model", "pre_tokenizer", "normalizer")
        )
        raise UserError(
            f"{tok.path}: llama.cpp reads byte-level BPE with GPT-2's pre-tokenizer, or SentencePiece-style BPE "
            f"(byte fallback, Metaspace); got {got}"
        )
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{tok.path}: {tok.vocab_size} tokens, more than the model's vocab_size {cfg.vocab_size}")
    vocab = {i: text for text, i in tok.tokenizer.get_vocab(with_added_tokens=True).items()}
    added, unk = tok.tokenizer.get_added_tokens_decoder(), spec["model"].get("unk_token")
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in spec["model"].get("merges", [])]
    types, tokens, kinds = gguf.TokenType, [], []
    for i in range(cfg.vocab_size):
        text = vocab.get(i)
        tokens.append(f"[PAD{i}]" if text is None else text)
        if text is None:
            kinds.append(types.UNUSED)
        elif kind == "sentencepiece" and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            kinds.append(types.BYTE)
        elif kind == "sentencepiece" and text == unk:
            kinds.append(types.UNKNOWN)
        elif i in added:
            kinds.append(types.CONTROL if added[i].special else types.USER_DEFINED)
        else:
            kinds.append(types.NORMAL)
    writer.add_tokenizer_model(LLAMA_CPP_TOKENIZERS[kind][0])
    writer.add_tokenizer_pre(LLAMA_CPP_TOKENIZERS[kind][1])
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    if kind == "byte-level":
        writer.add_token_merges([" ".join(m) for m in merges])
    else:
        rank = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        writer.add_token_scores([-float(rank.get(t, 0)) for t in tokens])
        writer.add_add_space_prefix(True)
    eos = cfg.eos_ids[0] if cfg.eos_ids else tok.eos_id
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tok.special_id("bos")
    if bos is None and hf.family_adapter(cfg.family).bos_is_eos:
        bos = eos
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else tok.pad_id
    special = [(writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos), (writer.add_pad_token_id, pad)]
    for add, token_id in [*special, (writer.add_unk_token_id, tok.special_id("unk"))]:
        if token_id is not None:
            add(token_id)
    first = tok.tokenizer.encode("a", add_special_tokens=True).ids[:1]
    writer.add_add_bos_token(bos is not None and first == [bos])
