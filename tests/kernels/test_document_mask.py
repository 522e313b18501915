"""Packed rows (`document_ids`): every document gets, in every backend, the outputs and gradients it gets alone.

The reference is each document's own slice of q, k and v (and of the key padding mask) through the float64
definition in test_triton_attention; documents are found there with unique_consecutive, independently of
llm.kernels.reference.document_bounds. Triton runs under the interpreter without a GPU (fp32, small grids);
flash-attn cannot be installed here, so its varlen path runs on a stand-in computed by the same definition.
"""

import math
import sys
import types

import pytest
import torch

from llm import kernels
from llm.kernels import flash_attn_backend, triton_attention
from tests.conftest import rel_err
from tests.kernels.test_triton_attention import DEVICE, attention_by_definition, inputs

# Two rows of 45 positions. Row 0: documents of 7, 1, 23 and 14 tokens; row 1: 31, 1 and 13, with ids that
# repeat across rows and within a row (a document is a run of equal ids: the two runs of 4 are two documents).
LENGTHS = [[7, 1, 23, 14], [31, 1, 13]]
IDS = [[3, 4, 5, 6], [4, 0, 4]]


def packed_document_ids() -> torch.Tensor:
    return torch.stack(
        [torch.repeat_interleave(torch.tensor(ids), torch.tensor(lengths)) for ids, lengths in zip(IDS, LENGTHS)]
    ).to(DEVICE)


def documents(document_ids: torch.Tensor):
    """(row, start, end) of every document: each run of equal ids in a row."""
    for b, row in enumerate(document_ids):
        ends = torch.unique_consecutive(row, return_counts=True)[1].cumsum(0).tolist()
        yield from ((b, start, end) for start, end in zip([0, *ends[:-1]], ends))


def each_document_alone(q, k, v, document_ids, causal, key_padding_mask=None, scale=None):
    """Float64 attention of every document on its own slice of q, k, v, written back at its positions."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b, s, e in documents(document_ids):
        mask = None if key_padding_mask is None else key_padding_mask[b : b + 1, s:e]
        piece = (x[b : b + 1, :, s:e] for x in (q, k, v))
        out[b : b + 1, :, s:e] = attention_by_definition(*piece, causal=causal, key_padding_mask=mask, scale=scale)
    return out


def document_error(ours, theirs, b, s, e) -> float:
    """rel_err on one document's slice; where the reference vanishes (dq and dk of a one-token document: a softmax
    over one key has no gradient) the slice's error is measured against the whole tensor's norm."""
    ours_doc, theirs_doc = ours[b, :, s:e].detach().double(), theirs[b, :, s:e].detach().double()
    if theirs_doc.norm() > 1e-9 * theirs.norm():
        return rel_err(ours_doc, theirs_doc)
    error = ((ours_doc - theirs_doc).norm() / theirs.norm()).item()
    return float("inf") if math.isnan(error) else error


def key_padding() -> torch.Tensor:
    """Padding in a document's middle (row 1) and a padded tail that holds a whole document (row 0)."""
    mask = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
    mask[0, 31:] = False
    mask[1, 3:9] = False
    return mask


def check_packed(fn, q, k, v, document_ids, causal, key_padding_mask=None, tol=1e-5, query_rows=None):
    """Per document: rel error of the output and of dq, dk, dv against the document alone; returns the output.
    `query_rows` (B, T): the query positions whose outputs are compared (the others carry no gradient)."""
    out = result = fn(q, k, v, causal=causal, key_padding_mask=key_padding_mask, document_ids=document_ids)
    grad_out = torch.randn_like(out)
    if query_rows is not None:
        grad_out = grad_out * query_rows[:, None, :, None]
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = each_document_alone(q64, k64, v64, document_ids, causal, key_padding_mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    if query_rows is not None:
        ref = ref * query_rows[:, None, :, None]
        out = out * query_rows[:, None, :, None]
    errors = {}
    for b, s, e in documents(document_ids):
        for name, ours, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            errors[f"{name} row {b} [{s}, {e})"] = document_error(ours, theirs, b, s, e)
    assert max(errors.values()) < tol, {name: err for name, err in errors.items() if err >= tol}
    return result


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_document_as_if_alone(backend, causal, padded):
    """GQA (4 query heads on 2), odd lengths, documents of one token, padding inside and after documents."""
    fn = lambda *a, **kw: kernels.attention(*a, **kw, backend=backend)
    mask = key_padding() if padded else None
    check_packed(fn, *inputs(2, 4, 2, 45, 45, 32), packed_document_ids(), causal, key_padding_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_document_per_row_is_plain_attention(backend):
    """MQA; a row that is one document attends as without document_ids."""
    q, k, v = inputs(2, 2, 1, 37, 37, 40)
    ids = torch.full((2, 37), 7, device=DEVICE)
    ours = kernels.attention(q, k, v, causal=True, document_ids=ids, backend=backend)
    assert rel_err(ours, attention_by_definition(q, k, v, causal=True)) < 1e-5


@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_triton_never_reads_whole_blocks_of_other_documents(causal):
    """Documents 0 and 1 fill whole blocks (any block size the kernels use divides their length); documents 0 and
    2 hold NaN in q and v. A kernel that visited their blocks for document 1 (the forward and dQ key blocks before
    it, the dK/dV query blocks after it, which causality alone does not rule out) would turn document 1's output
    or gradients into NaN, even where the elementwise mask drops them (0 * NaN). Document 1 must match its float64
    self alone."""
    whole = 32 if triton_attention.INTERPRET else 128
    t = 2 * whole + 13
    q, k, v = inputs(1, 2, 1, t, t, 32)
    mine = slice(whole, 2 * whole)
    with torch.no_grad():
        for x in (q, v):
            x[:, :, :whole] = x[:, :, 2 * whole :] = float("nan")
    ids = torch.arange(t, device=DEVICE)[None] // whole
    out = triton_attention.attention(q, k, v, causal=causal, document_ids=ids)
    grad_out = torch.zeros_like(out)
    grad_out[:, :, mine] = torch.randn_like(out[:, :, mine])
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    alone = [x[:, :, mine].detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_by_definition(*alone, causal=causal)
    ref_grads = torch.autograd.grad(ref, alone, grad_out[:, :, mine].double())
    assert torch.isnan(out[:, :, :whole]).all() and torch.isnan(out[:, :, 2 * whole :]).all()
    for ours, theirs in zip((out, *grads), (ref, *ref_grads)):
        assert rel_err(ours[:, :, mine], theirs) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_precision_compiled(dtype):
    """Rows of 2048 packed from documents of 1 to 600 tokens, GQA 8 on 2, head dim 128, causal, a padded tail."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 600, (2, 40), generator=generator).cumsum(1)
    ids = torch.stack([torch.bucketize(torch.arange(2048), row, right=True) for row in lengths]).to(DEVICE)
    mask = torch.ones(2, 2048, dtype=torch.bool, device=DEVICE)
    mask[1, 1900:] = False
    q, k, v = inputs(2, 8, 2, 2048, 2048, 128, dtype)
    out = kernels.attention(q, k, v, causal=True, key_padding_mask=mask, document_ids=ids, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = each_document_alone(q64, k64, v64, ids, True, mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    errors = [rel_err(ours, theirs) for ours, theirs in zip((out, *grads), (ref, *ref_grads))]
    assert max(errors) < 1e-2, errors


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flash_attn_varlen_path(causal, monkeypatch):
    """flash_attn_varlen_func replaced by the float64 definition per cu_seqlens sequence; padded queries output
    zeros (they are left out of the varlen batch) and every other position matches its document alone."""
    calls = []

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal):
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        lengths = cu_seqlens_q.diff()
        assert max_seqlen_q == max_seqlen_k == lengths.max() and dropout_p == 0.0
        calls.append(len(lengths))
        bounds = cu_seqlens_q.tolist()
        pieces = [
            attention_by_definition(*(x[s:e].transpose(0, 1)[None] for x in (q, k, v)), causal, scale=softmax_scale)[0]
            for s, e in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(pieces, dim=1).transpose(0, 1).to(q.dtype)

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = varlen
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    mask = key_padding()
    out = check_packed(
        flash_attn_backend.attention,
        *inputs(2, 4, 2, 45, 45, 32),
        packed_document_ids(),
        causal,
        key_padding_mask=mask,
        query_rows=mask,
    )
    assert calls == [6]  # one call; row 0's padded tail holds its last document entirely
    written = out.detach().ne(0).any(-1)
    assert torch.equal(written, mask[:, None].expand_as(written))


def test_varlen_layout_by_hand():
    """Runs of equal ids are documents, also when a row starts with the id the previous row ended with;
    padded positions leave the batch."""
    ids = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 3, 3]])
    keep = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    indices, cu_seqlens, max_seqlen = flash_attn_backend.varlen_layout(ids, keep)
    assert indices.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert cu_seqlens.tolist() == [0, 2, 4, 7, 8] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 3
    indices, cu_seqlens, max_seqlen = flash_attn_backend.varlen_layout(ids)
    assert indices.tolist() == list(range(10)) and cu_seqlens.tolist() == [0, 2, 5, 8, 10] and max_seqlen == 3


def test_backends_take_or_decline_document_ids():
    q = torch.empty(2, 4, 45, 32, dtype=torch.bfloat16)
    ids, mask = packed_document_ids().cpu(), key_padding().cpu()
    assert flash_attn_backend.attention_unsupported(q=q, key_padding_mask=mask, document_ids=ids) is None
    assert "padding" in flash_attn_backend.attention_unsupported(q=q, key_padding_mask=mask)
    assert triton_attention.attention_unsupported(q=q, k=q, v=q, document_ids=ids) is None


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.zeros(2, 44, dtype=torch.long), r"\(batch, seq\) = \(2, 45\)"),
        (torch.zeros(2, 45), "integer"),
        (torch.zeros(1, 45, dtype=torch.long), r"got torch.int64 \(1, 45\)"),
    ],
)
def test_bad_document_ids_raise(ids, match):
    q, k, v = inputs(2, 2, 2, 45, 45, 8)
    with pytest.raises(ValueError, match=match):
        kernels.attention(q, k, v, causal=True, document_ids=ids)


def test_document_ids_need_as_many_queries_as_keys():
    q, k, v = inputs(2, 2, 2, 1, 45, 8)
    with pytest.raises(ValueError, match="as many queries as keys"):
        kernels.attention(q, k, v, causal=True, document_ids=torch.zeros(2, 45, dtype=torch.long))
