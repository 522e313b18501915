"""Generation: the KV cache changes nothing, padding changes nothing, sampling filters
keep what they promise, and `llm generate` works end to end."""

import pytest
import torch

from llm.cli import main
from llm.models.config import ModelConfig
from llm.models.generation import decode_layout, filter_logits, generate
from llm.run.generate import generate_text
from llm.run.loader import save_pretrained
from llm.tasks import build_model
from tests.conftest import build

TINY = dict(vocab_size=61, max_seq_len=48, d_model=32, n_layers=2, n_heads=4, d_ff=64)
LLAMA = dict(TINY, family="llama", norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, n_kv_heads=2)


def tiny(arch: dict):
    cfg = ModelConfig(**arch)
    cfg.validate()
    return build_model(cfg).double().eval()


def recompute_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Independent reference: the whole sequence through the model at every step, argmax of the last logits."""
    for _ in range(n):
        with torch.no_grad():
            ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


@pytest.mark.parametrize("arch", [TINY, LLAMA], ids=["gpt", "llama-gqa"])
def test_cached_greedy_equals_recompute(arch):
    model = tiny(arch)
    ids = torch.randint(0, 61, (3, 7))
    cached = generate(model, ids, max_new_tokens=12, temperature=0)
    assert torch.equal(cached, generate(model, ids, max_new_tokens=12, temperature=0, use_cache=False))
    assert torch.equal(cached, recompute_greedy(model, ids, 12))


@pytest.mark.parametrize("arch", [TINY, LLAMA], ids=["gpt", "llama-gqa"])
def test_decode_layout_changes_the_memory_layout_only(arch, tmp_path):
    model = tiny(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 61, (2, 5))
    decode_layout(model)
    fc_in = model.transformer.blocks[0].mlp.fc_in
    assert fc_in.weight.stride() == (1, fc_in.out_features)  # laid out as its transpose (in, out)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(generate(model, ids, max_new_tokens=8, temperature=0), recompute_greedy(model, ids, 8))
    save_pretrained(model, tmp_path / "m")  # the saved weights are plain contiguous tensors again


@pytest.mark.parametrize("arch", [TINY, LLAMA], ids=["gpt", "llama-gqa"])
def test_cached_sampling_equals_recompute_and_left_padding_is_invisible(arch):
    model = tiny(arch)
    ids = torch.randint(0, 61, (2, 6))
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9)
    a = generate(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, ids, use_cache=False, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
    # a short prompt left-padded in a batch continues exactly as it does alone
    short = torch.randint(0, 61, (1, 3))
    batch = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), 1), ids[:1]), 0)
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    padded = generate(model, batch, max_new_tokens=8, attention_mask=mask, temperature=0)
    assert torch.equal(padded[0, 6:], recompute_greedy(model, short, 8)[0, 3:])
    assert torch.equal(padded[1], recompute_greedy(model, ids[:1], 8)[0])


def test_stops_at_eos_and_pads_finished_rows():
    model = tiny(TINY)
    ids = torch.randint(0, 61, (1, 5))
    first = recompute_greedy(model, ids, 1)[0, -1].item()
    out = generate(model, ids, max_new_tokens=10, temperature=0, eos_token_id=first)
    assert out.shape == (1, 6) and out[0, -1].item() == first


def test_filters_keep_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]
    # 0.4 + 0.3 = 0.7 < 0.8, so 0.15 joins; the rest is dropped
    kept = filter_logits(logits, top_p=0.8).isfinite()
    assert kept.tolist() == [[False, True, False, True, True]]
    assert filter_logits(logits, top_p=0.01).isfinite().sum() == 1


def train_tokenizer(path):
    """A tiny byte-level BPE trained in memory with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "hello world, the end"] * 20, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


def test_llm_generate_end_to_end(tmp_path, capsys):
    vocab = train_tokenizer(tmp_path / "tokenizer.json")
    model = build(dict(TINY, vocab_size=vocab, eos_token_id=0)).eval()
    save_pretrained(model, tmp_path / "model", tokenizer=tmp_path / "tokenizer.json")

    rc = main(["generate", "--model", str(tmp_path / "model"), "--prompt", "the cat", "--prompt", "hello",
               "--max-new-tokens", "6", "--temperature", "0"])  # fmt: skip
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("the cat") and lines[1].startswith("hello")
    assert len(lines[0]) > len("the cat") or len(lines[1]) > len("hello")  # something was generated

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for prompt, line in zip(["the cat", "hello"], lines):
        ids = torch.tensor([tok.encode(prompt).ids])
        ref = recompute_greedy(model, ids, 6)[0].tolist()
        if 0 in ref[ids.shape[1] :]:  # stops at EOS
            ref = ref[: ref.index(0, ids.shape[1])]
        assert line == tok.decode(ref)

    sampled = generate_text(model=str(tmp_path / "model"), prompt=["the"], max_new_tokens=5, top_k=5, seed=1)
    assert sampled == generate_text(model=str(tmp_path / "model"), prompt=["the"], max_new_tokens=5, top_k=5, seed=1)


def test_generate_errors_are_one_line(tmp_path, capsys):
    model = build(dict(TINY, family="bert", task="encoder", causal=False, norm_position="post"))
    save_pretrained(model, tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "generation needs a causal_lm or instruction model" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope: not found" in capsys.readouterr().err
