"""Chunked linear cross-entropy in Triton (interpreter on a CPU) against float64 torch."""

import pytest
import torch

from llm import kernels
from llm.kernels import reference
from llm.models.layers import LMHead
from tests.conftest import rel_err

triton_ce = pytest.importorskip("llm.kernels.triton_cross_entropy")


def _case(rows, dim, vocab, bias, ignored_every):
    hidden = torch.randn(rows, dim)
    weight = torch.randn(vocab, dim) / dim**0.5
    b = torch.randn(vocab) if bias else None
    labels = torch.randint(0, vocab, (rows,))
    if ignored_every:
        labels[::ignored_every] = -100
    return hidden, weight, b, labels


def _run(fn, hidden, weight, bias, labels, grad_scale, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], labels, leaves[2], **kw)
    (loss * grad_scale).backward()
    return loss, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize(
    "rows, dim, vocab, chunk, bias, ignored_every",
    [
        (37, 65, 301, 128, True, 5),  # chunks do not divide the vocabulary
        (3 * 37, 33, 129, 50, False, 3),
        (16, 48, 257, None, True, 0),  # default chunking, one chunk
    ],
)
def test_matches_float64(rows, dim, vocab, chunk, bias, ignored_every):
    hidden, weight, b, labels = _case(rows, dim, vocab, bias, ignored_every)
    loss, grads = _run(triton_ce.linear_cross_entropy, hidden, weight, b, labels, 1.7, chunk_size=chunk)
    as64 = [None if t is None else t.double() for t in (hidden, weight, b)]
    ref, ref_grads = _run(reference.linear_cross_entropy, *as64, labels, 1.7)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_err(loss, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert rel_err(g, r) < 1e-5


def test_all_labels_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, b, labels = _case(9, 17, 70, True, 0)
    labels[:] = -1
    loss, grads = _run(triton_ce.linear_cross_entropy, hidden, weight, b, labels, 1.0, ignore_index=-1, chunk_size=32)
    assert loss.item() == 0.0
    assert all(g.abs().max().item() == 0.0 for g in grads)


def test_label_outside_the_vocabulary_raises():
    hidden, weight, _, labels = _case(4, 8, 20, False, 0)
    labels[2] = 20
    with pytest.raises(ValueError, match="outside the vocabulary of 20"):
        triton_ce.linear_cross_entropy(hidden, weight, labels)


def test_chunk_width_bounds_the_logits_block():
    assert triton_ce.vocab_chunk(8192, 128256) * 8192 <= triton_ce.CHUNK_ELEMENTS
    assert triton_ce.vocab_chunk(4, 300) == 300


def test_lm_head_loss_through_the_triton_backend(monkeypatch):
    head = LMHead(24, 101, bias=True)
    torch.nn.init.normal_(head.weight, std=0.2)
    h = torch.randn(2, 9, 24)
    labels = torch.randint(0, 101, (2, 9))
    labels[0, :3] = -100
    monkeypatch.setenv("LLM_KERNELS", "linear_cross_entropy=triton")
    _, loss = head(h, labels, return_logits=False)
    loss.backward()
    ref = reference.linear_cross_entropy(
        h.flatten(0, 1).double(), head.weight.double(), labels.flatten(), head.bias.double()
    )
    assert rel_err(loss, ref) < 1e-5
    w64 = head.weight.detach().double().requires_grad_()
    reference.linear_cross_entropy(h.flatten(0, 1).double(), w64, labels.flatten(), head.bias.double()).backward()
    assert rel_err(head.weight.grad, w64.grad) < 1e-5
    assert kernels.dispatch.resolve("linear_cross_entropy", "auto", "cpu")[0] == "triton"


def test_no_tokens_gives_zero_loss():
    hidden, weight, _, _ = _case(0, 8, 20, False, 0)
    assert triton_ce.linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long)).item() == 0.0
