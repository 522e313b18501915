"""Cross-entropy fused with the output projection, over the vocabulary in chunks.

Forward: for each vocabulary chunk, logits = hidden @ weight[chunk].T (+ bias) in the
input dtype (cuBLAS), and a Triton kernel folds them into a running max and sum of
exponentials per row (online logsumexp, fp32) and picks the label's logit. Only the
(N,) logsumexp is kept. Backward recomputes each chunk's logits, a Triton kernel turns
them in place into d loss / d logits = (softmax - onehot) * grad / n_valid, and two
matmuls add that chunk's share of the hidden gradient and write its rows of the weight
gradient. So at most one (N, chunk) block of logits exists at a time, never the full
(N, V) logits in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llm.kernels import reference

# Elements of one logits chunk; the chunk width is this divided by the rows.
CHUNK_ELEMENTS = 1 << 25
BLOCK_V = 1024


@triton.jit
def _lse_chunk(Logits, Labels, Max, SumExp, Target, stride, v_start, chunk_width, BLOCK: tl.constexpr):
    """Fold one chunk of a row's logits into its running max / sum of exp; take the label's logit."""
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride
    m = tl.load(Max + row)
    s = tl.load(SumExp + row)
    for start in range(0, chunk_width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(Logits + cols, mask=cols < chunk_width, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    tl.store(Max + row, m)
    tl.store(SumExp + row, s)
    index = tl.load(Labels + row) - v_start
    inside = (index >= 0) & (index < chunk_width)
    target = tl.load(Logits + tl.where(inside, index, 0)).to(tl.float32)
    tl.store(Target + row, tl.where(inside, target, tl.load(Target + row)))


@triton.jit
def _grad_chunk(Logits, Labels, Lse, Scale, stride, v_start, chunk_width, ignore_index, BLOCK: tl.constexpr):
    """Overwrite one chunk of a row's logits with (softmax - onehot) * scale (zero for ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride
    label = tl.load(Labels + row)
    lse = tl.load(Lse + row)
    scale = tl.where(label == ignore_index, 0.0, tl.load(Scale))
    for start in range(0, chunk_width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < chunk_width
        z = tl.load(Logits + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(z - lse) - tl.where(cols + v_start == label, 1.0, 0.0)
        tl.store(Logits + cols, (g * scale).to(Logits.dtype.element_ty), mask=mask)


def vocab_chunk(rows: int, vocab: int) -> int:
    """Chunk width: about CHUNK_ELEMENTS logits at a time, a multiple of 256 columns."""
    return min(vocab, max(256, CHUNK_ELEMENTS // max(rows, 1) // 256 * 256))


def _chunk_logits(hidden, weight, bias, start, end):
    w = weight[start:end].to(hidden.dtype)
    b = bias[start:end].to(hidden.dtype) if bias is not None else None
    return F.linear(hidden, w, b).contiguous()


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, chunk_size):
        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = chunk_size or vocab_chunk(rows, vocab)
        running_max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
        sum_exp = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        target = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, vocab, chunk):
            logits = _chunk_logits(hidden, weight, bias, start, min(start + chunk, vocab))
            _lse_chunk[(rows,)](
                logits, labels, running_max, sum_exp, target, logits.stride(0), start, logits.shape[1], BLOCK=BLOCK_V
            )
        lse = running_max + torch.log(sum_exp)
        valid = labels != ignore_index
        n_valid = valid.sum().clamp(min=1)
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        loss = torch.where(valid, lse - target, 0.0).sum().to(out_dtype) / n_valid
        ctx.save_for_backward(hidden, weight, labels, bias, lse, n_valid)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, bias, lse, n_valid = ctx.saved_tensors
        rows, vocab = hidden.shape[0], weight.shape[0]
        need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
        scale = (grad_loss.float() / n_valid).reshape(1)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty_like(bias) if need_bias else None
        for start in range(0, vocab, ctx.chunk):
            end = min(start + ctx.chunk, vocab)
            grad_logits = _chunk_logits(hidden, weight, bias, start, end)
            _grad_chunk[(rows,)](
                grad_logits,
                labels,
                lse,
                scale,
                grad_logits.stride(0),
                start,
                end - start,
                ctx.ignore_index,
                BLOCK=BLOCK_V,
            )
            if need_hidden:
                grad_hidden += grad_logits @ weight[start:end].to(hidden.dtype)
            if need_weight:
                grad_weight[start:end] = grad_logits.T @ hidden
            if need_bias:
                grad_bias[start:end] = grad_logits.float().sum(0)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, grad_bias, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = reference.IGNORE_INDEX,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of hidden @ weight.T + bias over labels != ignore_index (see reference.py)."""
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise ValueError(
            f"linear_cross_entropy: label {labels[bad][0].item()} is outside the vocabulary of {vocab} "
            f"(and is not ignore_index={ignore_index})"
        )
    if hidden.shape[0] == 0:  # no tokens: nothing to launch
        return reference.linear_cross_entropy(hidden, weight, labels, bias, ignore_index)
    return LinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight, labels.contiguous(), bias, ignore_index, chunk_size
    )
