"""`llm convert --to gguf`: the gguf package's reader returns llm's tensors under llama.cpp's names and layouts
(f32 exactly; Q8_0 / Q4_0 blocks as the gguf package's own quantizer makes them; an llm int4 model as exact Q4_0),
and, where llama-cpp-python is installed, llama.cpp tokenizes as llm does, its greedy tokens equal llm's and its logits
match (rel < 1e-3)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from llm.cli import main
from llm.errors import UserError
from llm.run.convert import write_format
from llm.run.loader import save_pretrained
from llm.tasks.hf import hf_state_dict
from tests.conftest import build, rel_err
from tests.models.test_generation import train_tokenizer

gguf = pytest.importorskip("gguf")

GPT2 = dict(vocab_size=320, max_seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=128)
LLAMA = dict(GPT2, family="llama", n_kv_heads=2, d_ff=96, norm="rmsnorm", position="rotary", mlp="swiglu")
LLAMA.update(bias=False, tie_embeddings=False)
QWEN2 = dict(LLAMA, qkv_bias=True)  # q/k/v biases and no others: llama.cpp's qwen2
QWEN3 = dict(LLAMA, qk_norm=True)  # per-head q/k RMSNorm: llama.cpp's qwen3
FAMILIES = {"gpt2": GPT2, "llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3}
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # GPT-2's transposed Linear weights
TEXT = ["the cat sat on the mat", "hello world, the end"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    """A SentencePiece-style BPE as LLaMA 2 and Mistral ship it: byte fallback to "<0xXX>" tokens, words marked
    by a leading "▁" (trained split at spaces, applied unsplit, as SentencePiece does), "<s>" put in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(TEXT * 20, trainer)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = tmp_path_factory.mktemp("spm") / "tokenizer.json"
    tok.save(str(path))
    return path


def llama_cpp_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's `llama` rotates adjacent pairs: within each head, rows (i, i + d/2) become (2i, 2i + 1)."""
    d = w.shape[0] // heads
    order = torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), dim=1).flatten()
    return w.reshape(heads, d, *w.shape[1:])[:, order].reshape(w.shape)


def expected(model, arch: str) -> dict[str, np.ndarray]:
    """llama.cpp's f32 tensors of `model`: its Hugging Face state dict named by the gguf package's own table
    (convert_hf_to_gguf.py's route), GPT-2's Conv1D weights transposed, q/k rows of `llama` re-paired."""
    _, state = hf_state_dict(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.n_layers)
    cfg, out = model.config, {}
    for name, tensor in state.items():
        if name.endswith(CONV1D):
            tensor = tensor.t()
        if arch == "llama" and ".q_proj." in name:
            tensor = llama_cpp_rows(tensor, cfg.n_heads)
        if arch == "llama" and ".k_proj." in name:
            tensor = llama_cpp_rows(tensor, cfg.kv_heads)
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = tensor.float().numpy()
    return out


def read(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path / "model.gguf").tensors}


@pytest.mark.parametrize("arch", FAMILIES)
def test_f32_tensors_are_llms_under_llama_cpp_names(arch, tokenizer, tmp_path):
    model = build(FAMILIES[arch]).eval()
    write_format(model, tmp_path, "gguf", tokenizer)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert reader.fields["general.architecture"].contents() == arch
    ref, got = expected(model, arch), {t.name: t for t in reader.tensors}
    assert set(got) == set(ref)
    for name, t in got.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert np.array_equal(np.asarray(t.data).reshape(ref[name].shape), ref[name]), name
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.attention.head_count_kv"] == model.config.kv_heads
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 320


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0", "f16"])
def test_quantized_blocks_are_the_gguf_quantizers(gguf_type, tokenizer, tmp_path):
    model = build(dict(LLAMA, d_ff=80)).eval()  # d_ff 80: ffn_down rows are not whole blocks -> f16
    write_format(model, tmp_path, "gguf", tokenizer, gguf_type=gguf_type)
    ref, kind = expected(model, "llama"), gguf.GGMLQuantizationType[gguf_type.upper()]
    for name, t in read(tmp_path).items():
        want = kind if ref[name].ndim == 2 else gguf.GGMLQuantizationType.F32
        if want == kind and ref[name].shape[-1] % 32:
            want = gguf.GGMLQuantizationType.F16
        assert t.tensor_type == want, name
        blocks = gguf.quants.quantize(ref[name], want)
        assert np.array_equal(np.asarray(t.data).reshape(blocks.shape), blocks), name


def test_an_llm_int4_model_is_exact_q4_0_and_int8_is_refused(tokenizer, tmp_path):
    from llm.compress.quantize import unpack_int4
    from llm.transforms import apply_transform, plain_state

    spec = dict(GPT2, tie_embeddings=False)
    model = apply_transform(build(spec).eval(), {"name": "quantize", "method": "int4", "group_size": 32})
    write_format(model, tmp_path / "int4", "gguf", tokenizer)
    # the float model whose weights are the int4 model's values, mapped as any float model is
    state = plain_state(model)
    values = {}
    for name, t in state.items():
        if name.endswith(".qdata"):
            base = name.removesuffix(".qdata")
            values[base] = unpack_int4(t).float() * state[f"{base}.scale"].float().repeat_interleave(32, dim=1)
        elif not name.endswith((".scale", ".zero_point")):
            values[name] = t
    dense = build(spec)
    dense.load_state_dict(values)
    ref = expected(dense.eval(), "gpt2")
    tensors = read(tmp_path / "int4")
    matrices = [name for name, t in tensors.items() if t.tensor_type == gguf.GGMLQuantizationType.Q4_0]
    assert len(matrices) == 2 + 4 * 2 + 1  # embeddings, 4 linears per block, the head
    for name, t in tensors.items():
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert np.array_equal(data.reshape(ref[name].shape), ref[name]), name

    with pytest.raises(UserError, match="holds exactly as q4_0"):
        write_format(model, tmp_path / "q8", "gguf", tokenizer, gguf_type="q8_0")
    int8 = apply_transform(build(spec).eval(), {"name": "quantize", "method": "int8"})
    with pytest.raises(UserError, match="no GGUF type holds it exactly: convert the unquantized model with --gguf"):
        write_format(int8, tmp_path / "int8", "gguf", tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]  # nothing left of the refused ones


def test_a_structurally_pruned_model_keeps_its_smaller_shapes(tokenizer, tmp_path):
    from llm.compress.prune import prune_structured

    write_format(prune_structured(build(LLAMA), heads=1, neurons=16), tmp_path / "llama", "gguf", tokenizer)
    reader = gguf.GGUFReader(tmp_path / "llama" / "model.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (2, 1)
    assert fields["llama.feed_forward_length"] == 80 and fields["llama.attention.key_length"] == 16
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: (inputs, outputs)
    assert shapes["blk.1.attn_q.weight"] == (64, 32) and shapes["blk.1.attn_output.weight"] == (32, 64)
    with pytest.raises(UserError, match=r"llama.cpp's gpt2 needs n_heads \* head_dim == d_model"):
        write_format(prune_structured(build(GPT2), heads=1), tmp_path / "gpt", "gguf", tokenizer)


def test_a_sentencepiece_style_tokenizer_is_llama_cpps_llama_model(spm_tokenizer, tmp_path):
    write_format(build(LLAMA), tmp_path, "gguf", spm_tokenizer)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "model.gguf").fields.items()}
    types, tokens = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    assert [types[i] for i in range(3)] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert all(types[i] == gguf.TokenType.BYTE and tokens[i] == f"<0x{i - 3:02X}>" for i in range(3, 259))
    scores = fields["tokenizer.ggml.scores"]
    merged = [i for i in range(259, len(tokens)) if types[i] == gguf.TokenType.NORMAL and len(tokens[i]) > 1]
    assert merged and sorted(merged, key=lambda i: -scores[i]) == merged  # BPE's merge order: the trained ids'


def test_what_gguf_cannot_hold_is_one_line_and_leaves_nothing(tokenizer, tmp_path, capsys, monkeypatch):
    bert = build(dict(GPT2, family="bert", task="masked_lm", causal=False, norm_position="post"))
    save_pretrained(bert, tmp_path / "bert", tokenizer)
    assert main(["convert", str(tmp_path / "bert"), str(tmp_path / "out"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama.cpp runs causal LMs, not task 'masked_lm'" in err[0]
    assert "(formats that can: llm," in err[0]

    save_pretrained(build(GPT2), tmp_path / "gpt", tokenizer)
    (tmp_path / "file").write_text("")
    assert main(["convert", str(tmp_path / "gpt"), str(tmp_path / "file" / "out"), "--to", "gguf"]) == 2
    assert "file/out: cannot write" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "gpt"), str(tmp_path / "out"), "--to", "gguf", "--int8"]) == 2
    assert "--int8 does not apply to --to gguf" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    assert main(["convert", str(tmp_path / "gpt"), str(tmp_path / "out"), "--to", "gguf"]) == 2
    assert "pip install gguf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "file", "gpt"]


def trained(spec: dict, tokenizer, steps: int = 150):
    """A model that has learned the two sentences of TEXT, so that greedy decoding has clear winners."""
    from llm.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    ids = [i for text in TEXT for i in tok.encode(text) + [tok.eos_id]] * 4
    data = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    model = build(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


@pytest.mark.parametrize("arch", [*FAMILIES, "llama-sentencepiece", "llama-pruned", "gpt2-int4", "llama-int4"])
def test_llama_cpp_tokenizes_decodes_and_scores_as_llm(arch, tokenizer, spm_tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a benchmark extra, not installed here")
    from llm.compress.prune import prune_structured
    from llm.transforms import apply_transform

    variant = arch.partition("-")[2]
    model, tok = trained(FAMILIES[arch.partition("-")[0]], spm_tokenizer if variant == "sentencepiece" else tokenizer)
    if variant == "pruned":  # one kv group and 16 neurons fewer in every block
        model = prune_structured(model, heads=1, neurons=16)
    if variant == "int4":  # written as Q4_0; ggml's Q4_0 products round the activations to 8 bits
        model = apply_transform(model, {"name": "quantize", "method": "int4", "group_size": 32})
    tolerance = 1e-2 if variant == "int4" else 1e-3
    tokenizer = tok.path
    write_format(model, tmp_path, "gguf", tokenizer)
    runner = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    for prompt in ("the cat", "hello world,"):
        ids = tok.encode(prompt)
        assert runner.tokenize(prompt.encode(), add_bos=False, special=False) == ids
        ours = model.generate(torch.tensor([ids]), max_new_tokens=12, temperature=0)[0, len(ids) :].tolist()
        theirs = []
        for token in runner.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            theirs.append(token)
            if len(theirs) == len(ours):
                break
        assert theirs == ours, prompt
        # the logits along the way too: so small a model's greedy tokens barely depend on positions (q/k rows
        # left in Hugging Face's rotary order still give them; their logits are off by ~1e-2, right ones ~3e-5)
        runner.reset()
        runner.eval(ids + ours)
        with torch.no_grad():
            ref = model(torch.tensor([ids + ours])).logits[0]
        assert rel_err(torch.from_numpy(np.array(runner.scores[: len(ids + ours)])), ref) < tolerance, prompt
