"""Flash attention in Triton: forward and backward, causal or not, key padding, packed documents, GQA/MQA.

Forward (one program per query block and head): stream key/value blocks, keep a
running row max `m` and row sum `l` (online softmax, in base 2: scores are scaled
by `scale * log2(e)` so the exponential is `exp2`), rescale the accumulator when the
max moves, and write O = acc / l and the row logsumexp (base 2) for the backward.
Each program visits only the key blocks its rows may see, in three phases: masked
blocks at the start of the range (where the query block's documents begin), blocks
every row sees completely (no masking), then masked blocks on the causal diagonal,
at the end of a document or at the ragged end of the sequence. Causal programs skip
the blocks above the diagonal; with packed documents (`document_ids`) the key range
is bounded by the documents' start and end offsets, so whole key blocks of other
documents are never read (block-sparse, as FlexAttention's document mask).

Backward: a preprocess kernel computes delta = rowsum(dO * O); a dK/dV kernel (one
program per key block and key/value head) walks the query blocks that may see it
(the same three phases) of every query head in its group, recomputing
P = exp2(S - lse) from the saved logsumexp, so the group's gradients are summed in
registers without atomics; a dQ kernel (one program per query block and head) walks
the key blocks as the forward does. Accumulation is fp32.

Semantics match `llm.kernels.reference.attention`: causal masks are aligned to the
bottom right (query i sees key j when j <= i + Lk - Lq), `key_padding_mask` (B, Lk)
is True where a key may be attended, `document_ids` (B, T) keeps each query inside
its document (given to the kernels as int32 (B, T) start and end offsets of each
position's document), and a query that sees no key outputs zeros (its logsumexp is
stored as +inf so its P, and its gradients, are zero).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from llm.kernels.reference import document_bounds

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------- block ranges


@triton.jit
def _document_bounds(start_base, end_base, idx, ok, length):
    """The document [start, end) of each position `idx` of one row (where `ok`; elsewhere [0, 0)), and over them
    the least start, greatest start, least end and greatest end: [least start, greatest end) holds every position
    any of them attends to (or is attended by), [greatest start, least end) the positions all of them do."""
    start = tl.load(start_base + idx, mask=ok, other=0)
    end = tl.load(end_base + idx, mask=ok, other=0)
    lo = tl.min(tl.where(ok, start, length))
    full_hi = tl.min(tl.where(ok, end, length))
    return start, end, lo, tl.max(start), full_hi, tl.max(end)


@triton.jit
def _phases(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """Split the range [lo, hi) a program visits into block-aligned parts: masked [lo, full_lo), unmasked
    [full_lo, full_hi) (the blocks inside [full_lo, full_hi), which every position of the program sees whole)
    and masked [full_hi, hi). All bounds >= 0."""
    lo = lo // BLOCK * BLOCK
    full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK) * BLOCK, hi)
    full_hi = tl.maximum(full_hi // BLOCK * BLOCK, full_lo)
    return lo, full_lo, full_hi


@triton.jit
def _key_range(
    start_base, end_base, rows, start_m, Lq, Lk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """The key phases (lo, full_lo, full_hi, hi) of the query block at `start_m`, the documents of its rows and
    the causal shift Lk - Lq. (Rows of the forward and dQ kernels.)"""
    causal_shift = Lk - Lq
    lo, full_lo, full_hi, hi = 0, 0, Lk, Lk
    doc_start, doc_end = rows, rows  # unused without documents
    if HAS_DOCS:
        doc_start, doc_end, lo, full_lo, full_hi, hi = _document_bounds(start_base, end_base, rows, rows < Lq, Lk)
    if CAUSAL:  # row i sees keys j <= i + causal_shift
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + causal_shift, hi), 0)
        full_hi = tl.maximum(tl.minimum(start_m + causal_shift + 1, full_hi), 0)
    lo, full_lo, full_hi = _phases(lo, full_lo, full_hi, hi, BLOCK_N)
    return lo, full_lo, full_hi, hi, doc_start, doc_end, causal_shift


# ---------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    pad_base,
    stride_kn,
    stride_vn,
    rows,
    doc_start,
    doc_end,
    offs_n,
    offs_d,
    lo,
    hi,
    Lk,
    causal_shift,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold key blocks [lo, hi) into the running (acc, l, m); MASKED applies causal, document and length masks."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & (cols[None, :] < Lk), other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < Lk) & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if MASKED:
            keep = cols[None, :] < Lk
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + causal_shift)
            if HAS_DOCS:
                keep = keep & (cols[None, :] >= doc_start[:, None]) & (cols[None, :] < doc_end[:, None])
            s = tl.where(keep, s, float("-inf"))
        if HAS_PAD:
            pad = tl.load(pad_base + cols, mask=cols < Lk, other=0)
            s = tl.where(pad[None, :] != 0, s, float("-inf"))
        # m starts at a finite -1e30, so fully masked blocks give p = exp2(-inf) = 0, never NaN
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    OUT,
    LSE,
    PAD,
    DOC_START,
    DOC_END,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_pad,
    stride_doc,
    H,
    GROUP,
    Lq,
    Lk,
    qk_scale,
    LQ_BUCKET,  # autotune keys: powers of two so a growing decode length does not retune each step
    LK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # heaviest causal blocks (the last rows) first, so the tail of the grid is short
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = off_h // GROUP
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    io_mask = (rows[:, None] < Lq) & d_ok[None, :]

    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :], mask=io_mask, other=0.0
    )
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    pad_base = PAD + off_b * stride_pad
    lo, full_lo, full_hi, hi, doc_start, doc_end, causal_shift = _key_range(
        DOC_START + off_b * stride_doc, DOC_END + off_b * stride_doc, rows, start_m, Lq, Lk,
        BLOCK_M, BLOCK_N, CAUSAL, HAS_DOCS,
    )  # fmt: skip

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_DOCS:  # without documents every range starts at 0 unmasked
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, pad_base, stride_kn, stride_vn, rows, doc_start, doc_end, offs_n,
            offs_d, lo, full_lo, Lk, causal_shift, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_PAD, HAS_DOCS, DOT_PRECISION,
        )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, pad_base, stride_kn, stride_vn, rows, doc_start, doc_end, offs_n, offs_d,
        full_lo, full_hi, Lk, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_PAD, HAS_DOCS, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, pad_base, stride_kn, stride_vn, rows, doc_start, doc_end, offs_n, offs_d,
        full_hi, hi, Lk, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_PAD, HAS_DOCS, DOT_PRECISION,
    )  # fmt: skip

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=io_mask)
    tl.store(LSE + (off_b * H + off_h) * Lq + rows, lse, mask=rows < Lq)


# --------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta(
    OUT,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    H,
    Lq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id, the row term of dS = P * (dP - delta)."""
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + (off_b * H + off_h) * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_dom,
    cols,
    doc_start,
    doc_end,
    offs_m,
    offs_d,
    lo,
    hi,
    Lq,
    causal_shift,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Add the contributions of query blocks [lo, hi) of one head to this key block's dK and dV (transposed layout)."""
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Lq
        qt = tl.load(
            q_base + rows[None, :] * stride_qm + offs_d[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0
        )
        do = tl.load(
            do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        )
        # rows past the end load lse = +inf, so their P is exactly zero
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=DOT_PRECISION)
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        if MASKED and CAUSAL:
            pt = tl.where(cols[:, None] <= rows[None, :] + causal_shift, pt, 0.0)
        if MASKED and HAS_DOCS:  # the queries of key j's document, [doc_start[j], doc_end[j])
            pt = tl.where((rows[None, :] >= doc_start[:, None]) & (rows[None, :] < doc_end[:, None]), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    PAD,
    DOC_START,
    DOC_END,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_pad,
    stride_doc,
    H,
    GROUP,
    SPLITS,
    Lq,
    Lk,
    qk_scale,
    sm_scale,
    LQ_BUCKET,
    LK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key block of one key/value head; sums over the GROUP query heads that share it, or over
    GROUP / SPLITS of them when the group is split across programs (partial sums in fp32, added by the host)."""
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)  # key/value head * SPLITS + split
    off_hk = pid_h // SPLITS
    heads_per_program = GROUP // SPLITS
    first_h = off_hk * GROUP + (pid_h % SPLITS) * heads_per_program
    off_b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(
        K + off_b * stride_kb + off_hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + off_b * stride_vb + off_hk * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )

    # Columns are independent here: keys past Lk or padded get garbage P only in their own
    # rows of dK/dV, which are dropped (past Lk) or zeroed (padded) at the end. The query rows
    # that see key j are those of its document (Lq = Lk there) and, when causal, rows >= j - causal_shift.
    causal_shift = Lk - Lq
    lo, full_lo, full_hi, hi = 0, 0, Lq, Lq
    doc_start, doc_end = cols, cols  # unused without documents
    if HAS_DOCS:
        doc_start, doc_end, lo, full_lo, full_hi, hi = _document_bounds(
            DOC_START + off_b * stride_doc, DOC_END + off_b * stride_doc, cols, cols < Lk, Lq
        )
    if CAUSAL:
        lo = tl.maximum(tl.maximum(start_n - causal_shift, 0), lo)
        full_lo = tl.maximum(tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0), full_lo)
    lo, full_lo, full_hi = _phases(lo, full_lo, full_hi, hi, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(heads_per_program):
        off_h = first_h + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base = LSE + (off_b * H + off_h) * Lq
        delta_base = DELTA + (off_b * H + off_h) * Lq
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, doc_start, doc_end,
            offs_m, offs_d, lo, full_lo, Lq, causal_shift, qk_scale,
            HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_DOCS, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, doc_start, doc_end,
            offs_m, offs_d, full_lo, full_hi, Lq, causal_shift, qk_scale,
            HEAD_DIM, BLOCK_M, False, CAUSAL, HAS_DOCS, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, doc_start, doc_end,
            offs_m, offs_d, full_hi, hi, Lq, causal_shift, qk_scale,
            HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_DOCS, DOT_PRECISION,
        )  # fmt: skip

    dk = dk * sm_scale
    if HAS_PAD:
        keep = tl.load(PAD + off_b * stride_pad + cols, mask=cols < Lk, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    dk_ptrs = DK + off_b * stride_dkb + pid_h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + pid_h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    pad_base,
    stride_kn,
    stride_vn,
    rows,
    doc_start,
    doc_end,
    offs_n,
    offs_d,
    lo,
    hi,
    Lk,
    causal_shift,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Add the contributions of key blocks [lo, hi) to this query block's dQ."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
        vt_ptrs = v_base + cols[None, :] * stride_vn + offs_d[:, None]
        if MASKED:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & (cols[None, :] < Lk), other=0.0)
            vt = tl.load(vt_ptrs, mask=d_ok[:, None] & (cols[None, :] < Lk), other=0.0)
        elif HEAD_DIM == BLOCK_D:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            keep = cols[None, :] < Lk
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + causal_shift)
            if HAS_DOCS:
                keep = keep & (cols[None, :] >= doc_start[:, None]) & (cols[None, :] < doc_end[:, None])
            p = tl.where(keep, p, 0.0)
        if HAS_PAD:
            pad = tl.load(pad_base + cols, mask=cols < Lk, other=0)
            p = tl.where(pad[None, :] != 0, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    PAD,
    DOC_START,
    DOC_END,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_pad,
    stride_doc,
    H,
    GROUP,
    Lq,
    Lk,
    qk_scale,
    sm_scale,
    LQ_BUCKET,
    LK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = off_h // GROUP
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :], mask=io_mask, other=0.0
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
        mask=io_mask,
        other=0.0,
    )
    lse = tl.load(LSE + (off_b * H + off_h) * Lq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + (off_b * H + off_h) * Lq + rows, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    pad_base = PAD + off_b * stride_pad
    lo, full_lo, full_hi, hi, doc_start, doc_end, causal_shift = _key_range(
        DOC_START + off_b * stride_doc, DOC_END + off_b * stride_doc, rows, start_m, Lq, Lk,
        BLOCK_M, BLOCK_N, CAUSAL, HAS_DOCS,
    )  # fmt: skip

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_DOCS:
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, pad_base, stride_kn, stride_vn, rows, doc_start, doc_end,
            offs_n, offs_d, lo, full_lo, Lk, causal_shift, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_PAD, HAS_DOCS, DOT_PRECISION,
        )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, pad_base, stride_kn, stride_vn, rows, doc_start, doc_end,
        offs_n, offs_d, full_lo, full_hi, Lk, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_PAD, HAS_DOCS, DOT_PRECISION,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, pad_base, stride_kn, stride_vn, rows, doc_start, doc_end,
        offs_n, offs_d, full_hi, hi, Lk, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_PAD, HAS_DOCS, DOT_PRECISION,
    )  # fmt: skip
    dq = dq * sm_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=io_mask)


# -------------------------------------------------------------------- launch configs

# The interpreter runs every program in Python: a few small, unequal blocks keep tests fast
# while still exercising full, diagonal and ragged blocks.
INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Candidates for Hopper/Ampere (BLOCK_M, BLOCK_N, warps, stages); the autotuner keeps the fastest per head
# dim, dtype, causality and length bucket, and skips configs that do not fit in shared memory. Checked by
# compiling for sm_90 (ptxas -v): at head dim 128 these use at most 255 registers with little or no spilling;
# the dK/dV kernel holds two fp32 accumulators (BLOCK_N x D) and needs 8 warps at BLOCK_N = 128.
FWD_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3)]
)
DKDV_CONFIGS = _configs(
    [(32, 128, 8, 3), (16, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 8, 3)]
)
DQ_CONFIGS = _configs([(128, 32, 8, 3), (128, 32, 8, 4), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)])
TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_PAD", "HAS_DOCS"]

_fwd_tuned = triton.autotune(FWD_CONFIGS, key=TUNE_KEY)(_attn_fwd)
_dkdv_tuned = triton.autotune(DKDV_CONFIGS, key=TUNE_KEY)(_attn_bwd_dkdv)
_dq_tuned = triton.autotune(DQ_CONFIGS, key=TUNE_KEY)(_attn_bwd_dq)


def _launch(kernel, tuned, name: str, blocks_along: str, length: int, heads: int, batch: int, *args, **meta) -> None:
    """Run `kernel` with fixed small blocks in the interpreter, else its autotuned twin."""
    if INTERPRET:
        block_m, block_n = INTERPRET_BLOCKS[name]
        block = block_m if blocks_along == "BLOCK_M" else block_n
        kernel[(triton.cdiv(length, block), heads, batch)](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        tuned[lambda cfg: (triton.cdiv(length, cfg[blocks_along]), heads, batch)](*args, **meta)


# The dK/dV kernel runs one program per key block and key/value head. With few of those (MQA, small
# batch) it splits each head's query group over programs until the grid fills the card; the estimate
# uses the largest candidate key block, as the autotuner's choice is not known before the launch.
KEY_BLOCK_ESTIMATE = INTERPRET_BLOCKS["dkdv"][1] if INTERPRET else 128


@functools.cache
def _min_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: small, so that the tests see split and unsplit groups
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _group_splits(group: int, programs: int, min_programs: int) -> int:
    """The smallest divisor of `group` that gives at least `min_programs` programs (the group when none does)."""
    for splits in range(1, group + 1):
        if group % splits == 0 and programs * splits >= min_programs:
            return splits
    return group


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 16))


# ------------------------------------------------------------------------ host side


def _meta(q: torch.Tensor, causal: bool, pad: torch.Tensor | None, docs: torch.Tensor | None) -> dict:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        CAUSAL=causal,
        HAS_PAD=pad is not None,
        HAS_DOCS=docs is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _mask_args(q: torch.Tensor, pad: torch.Tensor | None, docs: torch.Tensor | None) -> tuple[tuple, tuple]:
    """The kernels' (PAD, DOC_START, DOC_END) pointers and (stride_pad, stride_doc); q stands in for an absent mask
    (its kernels never read it)."""
    pad_ptr, pad_stride = (pad, pad.stride(0)) if pad is not None else (q, 0)
    doc_ptrs, doc_stride = ((docs[0], docs[1]), docs.stride(1)) if docs is not None else ((q, q), 0)
    return (pad_ptr, *doc_ptrs), (pad_stride, doc_stride)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q, k, v, pad, docs, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    mask_ptrs, mask_strides = _mask_args(q, pad, docs)
    _launch(
        _attn_fwd, _fwd_tuned, "fwd", "BLOCK_M", lq, h, b,
        q, k, v, o, lse, *mask_ptrs,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *mask_strides,
        h, h // hkv, lq, lk, scale * LOG2E, _bucket(lq), _bucket(lk),
        **_meta(q, causal, pad, docs),
    )  # fmt: skip
    return o, lse


def _backward(do, q, k, v, o, lse, pad, docs, causal: bool, scale: float):
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    meta = _meta(q, causal, pad, docs)
    delta = torch.empty_like(lse)
    block = 16 if INTERPRET else 64
    _attn_bwd_delta[(triton.cdiv(lq, block), h, b)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], h, lq,
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=block,
    )  # fmt: skip
    group = h // hkv
    splits = _group_splits(group, b * hkv * triton.cdiv(lk, KEY_BLOCK_ESTIMATE), _min_programs(q.device))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    if splits == 1:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    else:  # per-split partial sums, (B, Hkv * splits, Lk, D) in fp32, added below
        dk, dv = (torch.empty(b, hkv * splits, lk, d, device=q.device, dtype=torch.float32) for _ in range(2))
    mask_ptrs, mask_strides = _mask_args(q, pad, docs)
    common = (lq, lk, scale * LOG2E, scale, _bucket(lq), _bucket(lk))
    _launch(
        _attn_bwd_dkdv, _dkdv_tuned, "dkdv", "BLOCK_N", lk, hkv * splits, b,
        q, k, v, do, lse, delta, dk, dv, *mask_ptrs,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        *mask_strides, h, group, splits, *common, **meta,
    )  # fmt: skip
    if splits > 1:
        dk = dk.view(b, hkv, splits, lk, d).sum(2).to(k.dtype)
        dv = dv.view(b, hkv, splits, lk, d).sum(2).to(v.dtype)
    _launch(
        _attn_bwd_dq, _dq_tuned, "dq", "BLOCK_M", lq, h, b,
        q, k, v, do, lse, delta, dq, *mask_ptrs,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        *mask_strides, h, group, *common, **meta,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """O = softmax(Q K^T * scale) V; saves (Q, K, V, O, logsumexp), never the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, pad: torch.Tensor | None, docs: torch.Tensor | None, scale: float):
        """pad: uint8 (B, Lk), non-zero where a key may be attended; docs: int32 (2, B, T), the start and end
        offsets of each position's document (reference.document_bounds)."""
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        o, lse = _forward(q, k, v, pad, docs, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, pad, docs)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, pad, docs = ctx.saved_tensors
        dq, dk, dv = _backward(_last_dim_contiguous(do), q, k, v, o, lse, pad, docs, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def attention_unsupported(
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    **_,
) -> str | None:
    """Why this kernel cannot run the call (None when it can); the dispatcher falls back on it.
    Without tensors (`available_backends` asks about the backend in general) there is nothing to refuse."""
    if dropout_p:
        return "attention dropout is not implemented in the Triton kernel"
    if q is None or k is None or v is None:
        return None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expects (batch, heads, seq, head_dim) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit together"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"needs q, k, v all in fp32, fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} is outside 1..{MAX_HEAD_DIM}"
    if k.device != q.device or v.device != q.device:
        return "q, k and v are on different devices"
    if key_padding_mask is not None and key_padding_mask.shape not in ((q.shape[0], k.shape[2]), (1, k.shape[2])):
        return (
            f"key_padding_mask must be (batch, k_len) = {(q.shape[0], k.shape[2])}, got {tuple(key_padding_mask.shape)}"
        )
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head; q (B, H, Lq, D), k/v (B, Hkv, Lk, D); see reference.py."""
    reason = attention_unsupported(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    if reason:
        raise ValueError(f"triton attention: {reason}")
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=q.device, dtype=torch.bool)
        pad = pad.expand(q.shape[0], k.shape[2]).contiguous().view(torch.uint8)
    docs = None if document_ids is None else torch.stack(document_bounds(document_ids))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttention.apply(q, k, v, bool(causal), pad, docs, scale)
