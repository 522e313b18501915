"""2:4 semi-structured sparsity on a GPU: does half the weights (two of every four, the n:m mask of
llm.compress.prune) buy time in a Linear layer? Dense bf16 F.linear against the same weight pruned 2:4 and
compressed by torch's to_sparse_semi_structured (sparse tensor cores, Mishra et al. 2021), at decode (1 and 16
tokens) and prefill (2048 tokens) on LLaMA-8B-shaped layers. Unstructured sparsity saves nothing on any of
llm's paths (zeros are stored densely); this is the one form with a kernel.

    PYTHONPATH=. python benchmarks/sparse_24.py            # on a CUDA GPU (benchmarks/gpu_suite.sh runs it)
    PYTHONPATH=. python benchmarks/sparse_24.py --dry-run  # on a CPU: the masks and the rows' layout only

Writes sparse_24-<date>.json under $OUT or benchmarks/results/: per shape the dense and 2:4 times (ms), the
speed-up, and the 2:4 output's error against the dense product of the pruned weight (a row that could not
run says why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.bench.common import format_table, median, time_fn, write_results  # noqa: E402
from llm.compress.prune import nm_mask  # noqa: E402

LAYERS = {
    "qkv/proj 4096 -> 4096": (4096, 4096),
    "fc_in 4096 -> 14336": (14336, 4096),
    "fc_out 14336 -> 4096": (4096, 14336),
}
TOKENS = (1, 16, 2048)


def pruned_weight(n: int, k: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A random (n, k) weight with the 2 smallest |w| of every 4 consecutive inputs zeroed."""
    w = torch.randn(n, k, device=device, dtype=torch.float32)
    return (w * nm_mask(w.abs(), 2, 4)).to(dtype)


def measure(name: str, n: int, k: int, tokens: int, repeat: int) -> dict:
    from torch.sparse import to_sparse_semi_structured

    row = {"layer": name, "tokens": tokens}
    w = pruned_weight(n, k, "cuda", torch.bfloat16)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    try:
        sparse = to_sparse_semi_structured(w)
        dense_ms = median(time_fn(lambda: F.linear(x, w), repeat=repeat)) * 1e3
        sparse_ms = median(time_fn(lambda: F.linear(x, sparse), repeat=repeat)) * 1e3
        expected = F.linear(x.float(), w.float())
        error = ((F.linear(x, sparse).float() - expected).norm() / expected.norm()).item()
    except Exception as e:  # a shape or card the sparse kernels do not take: the row says so
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    return {**row, "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "rel_err": error}


def dry_run() -> list[dict]:
    """On a CPU: each layer's mask keeps exactly 2 of every 4 weights (small stand-ins of the shapes)."""
    rows = []
    for name, (n, k) in LAYERS.items():
        w = pruned_weight(n // 64, k // 64, "cpu", torch.float32)
        kept = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        rows.append({"layer": name, "tokens": 0, "kept_per_4": float(kept.float().mean()), "error": "needs a GPU"})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check the masks on a CPU; time nothing")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("sparse_24: no CUDA GPU; use --dry-run", file=sys.stderr)
            return 2
        rows = dry_run()
    else:
        rows = [measure(name, n, k, t, args.repeat) for name, (n, k) in LAYERS.items() for t in TOKENS]
    print(format_table(rows, headers={"dense_ms": "dense (ms)", "sparse_ms": "2:4 (ms)"}))
    print(f"wrote {write_results('sparse_24', rows, dry_run=args.dry_run)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
