"""`llm bench data`: how fast shards on disk become causal-LM batches, and how fast prepare tokenizes.

Loader: 32 x 2048 batches (input_ids + labels, int64) from a shard directory through
PackedTokens + StatefulLoader + collate_causal_lm, against nanoGPT's plain numpy-memmap
random-window `get_batch` over the same tokens (a flat uint16 .bin), both in this process on
one thread, measured in alternating rounds. Tokenization: `prepare` of the standard library on
all cores, MB of UTF-8 text per second (after training a BPE tokenizer on part of it), side by
side with the same tokenizer's own `encode_batch` alone on the same documents, in the same
~1 MB batches, on the same cores (text already in memory, ids left as Encoding objects), in
alternating rounds; the ratio prepare / encode_batch is what prepare's own work costs.
Integrity: a fresh reader (open every shard, then the batches) with the read-time checks on and off.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llm.bench.common import environment, format_table, median, write_results

BATCH, SEQ = 32, 2048


def _memmap_get_batch(data: np.ndarray, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: random windows of a uint16 memmap, x and y stacked as int64."""
    ix = torch.randint(len(data) - SEQ, (BATCH,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i : i + SEQ].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + SEQ].astype(np.int64)) for i in ix])
    return x, y


def _time_batches(next_batch, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        next_batch()
    return BATCH * SEQ * batches / (time.perf_counter() - start)


def _endless(loader):
    while True:
        yield from loader


def _encode_batch_mb_per_s(tokenizer_path, stdlib_bytes: int) -> float:
    """MB/s of the tokenizer's own encode_batch over prepare's documents and batches, all cores."""
    from llm.data import Tokenizer
    from llm.data.prepare import _chunks
    from llm.data.sources import expand_sources

    chunks = list(_chunks(expand_sources("stdlib", stdlib_bytes), "text"))
    nbytes = sum(len(t.encode("utf-8")) for chunk in chunks for t in chunk)
    tok = Tokenizer(tokenizer_path).tokenizer
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        start = time.perf_counter()
        for chunk in chunks:
            tok.encode_batch(chunk, add_special_tokens=False)
        seconds = time.perf_counter() - start
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    return nbytes / 1e6 / seconds


def _integrity_cost(train: Path, batches: int, rounds: int) -> dict[str, dict[bool, list[float]]]:
    """Tokens/s with the read-time integrity check (token ids against the manifest at open, each
    shard's sha256 in a background thread) on and off, in alternating rounds: "fresh" = open every
    shard, read `batches` batches, wait for the hashing to finish (the check's whole one-time cost);
    "steady" = the next `batches` batches of the same reader (the loader throughput afterwards)."""
    from llm.data import PackedTokens, StatefulLoader, collate_causal_lm
    from llm.data import shards as S

    out: dict[str, dict[bool, list[float]]] = {"fresh": {True: [], False: []}, "steady": {True: [], False: []}}
    try:
        for _ in range(rounds):
            for check in (True, False):
                S.VERIFY_ON_OPEN = check
                S._verified.clear()
                start = time.perf_counter()
                stream = PackedTokens(train, SEQ, seed=0)
                loader = _endless(StatefulLoader(stream, BATCH, collate_causal_lm))
                for _ in range(batches):
                    next(loader)
                stream.integrity.join()  # the check's whole cost counts, even if it outlasts the batches
                out["fresh"][check].append(BATCH * SEQ * batches / (time.perf_counter() - start))
                out["steady"][check].append(_time_batches(loader.__next__, batches))
    finally:
        S.VERIFY_ON_OPEN = True
    return out


def run(
    *, stdlib_bytes: int, batches: int, png: bool, out_dir: str | None, tokenize_rounds: int, rounds: int = 5
) -> Path:
    from llm.data import PackedTokens, StatefulLoader, collate_causal_lm, prepare, train_tokenizer
    from llm.data.shards import load_manifest, shard_tokens

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="llm-bench-data-") as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer("stdlib", tmp / "tok", vocab_size=8192, limit_bytes=min(stdlib_bytes, 5_000_000))
        prepare_mbs, encode_mbs = [], []
        for i in range(tokenize_rounds):
            encode_mbs.append(_encode_batch_mb_per_s(tok, stdlib_bytes))
            start = time.perf_counter()
            summary = prepare("stdlib", tok, tmp / f"shards{i}", limit_bytes=stdlib_bytes)
            prepare_mbs.append(summary["text_bytes"] / 1e6 / (time.perf_counter() - start))
        train = tmp / f"shards{tokenize_rounds - 1}" / "train"

        # the same tokens as one flat uint16 file for the baseline
        manifest = load_manifest(train)
        flat = np.concatenate([shard_tokens(train / s["file"], s, manifest["dtype"])[0] for s in manifest["shards"]])
        flat.astype(np.uint16).tofile(tmp / "tokens.bin")
        memmap = np.memmap(tmp / "tokens.bin", dtype=np.uint16, mode="r")

        loader_batches = _endless(StatefulLoader(PackedTokens(train, SEQ, seed=0), BATCH, collate_causal_lm))
        generator = torch.Generator().manual_seed(0)
        ours = lambda: next(loader_batches)  # noqa: E731
        plain = lambda: _memmap_get_batch(memmap, generator)  # noqa: E731
        batch = ours()
        assert batch["input_ids"].shape == (BATCH, SEQ) and batch["labels"].dtype == torch.int64
        for fn in (ours, plain):  # warm the page cache and both code paths
            _time_batches(fn, 10)
        ours_tps, plain_tps = [], []
        for _ in range(rounds):
            ours_tps.append(_time_batches(ours, batches))
            plain_tps.append(_time_batches(plain, batches))
        integrity = _integrity_cost(train, batches, rounds)

    ours_med, plain_med = median(ours_tps), median(plain_tps)
    rows = [
        {
            "measure": "causal-LM batches 32x2048, 1 thread",
            "llm PackedTokens (M tok/s)": ours_med / 1e6,
            "numpy memmap get_batch (M tok/s)": plain_med / 1e6,
            "ratio": ours_med / plain_med,
        },
    ]
    ratios = [p / e for p, e in zip(prepare_mbs, encode_mbs)]
    integrity_rows = [
        {
            "measure": measure,
            "integrity on (M tok/s)": median(integrity[key][True]) / 1e6,
            "integrity off (M tok/s)": median(integrity[key][False]) / 1e6,
            "cost (%)": 100 * (1 - median(integrity[key][True]) / median(integrity[key][False])),
        }
        for key, measure in (
            ("steady", f"loader throughput, {batches} batches"),
            ("fresh", f"fresh reader: open + {batches} batches + hashing done"),
        )
    ]
    token_rows = [
        {
            "measure": "tokenization, all cores",
            "text (MB)": summary["text_bytes"] / 1e6,
            "tokens (M)": summary["train"]["tokens"] / 1e6,
            "prepare (MB/s)": median(prepare_mbs),
            "encode_batch (MB/s)": median(encode_mbs),
            "prepare / encode_batch": median(ratios),
            "cores": environment()["cpu_count"],
        }
    ]
    print(format_table(rows, notes={"ratio": "llm / numpy memmap (above 1: llm is faster)"}))
    print()
    print(
        format_table(
            token_rows,
            notes={
                "prepare (MB/s)": "UTF-8 text bytes / wall time of the whole prepare (read, tokenize, dedup, split, "
                "write shards and manifests), median of the rounds",
                "encode_batch (MB/s)": "the same bytes / time of the tokenizer's encode_batch alone over the same "
                "documents in the same batches, text already in memory, median of the rounds",
                "prepare / encode_batch": "median over rounds of the per-round ratio (rounds alternate the two)",
            },
        )
    )
    print()
    print(
        format_table(
            integrity_rows,
            notes={"cost (%)": "100 x (1 - on / off), medians of the alternating rounds"},
        )
    )
    path = write_results(
        "data",
        rows + token_rows + integrity_rows,
        out_dir,
        loader_tokens_per_s={"llm": ours_tps, "numpy_memmap": plain_tps},
        tokenize_mb_per_s={"prepare": prepare_mbs, "encode_batch": encode_mbs, "ratio": ratios},
        integrity_tokens_per_s={k: {"on": v[True], "off": v[False]} for k, v in integrity.items()},
        tokens_in_shards=int(len(flat)),
        load_average_1_5_15min=list(os.getloadavg()),  # the machine may be shared
        batch=[BATCH, SEQ],
    )
    print(f"\nwrote {path}")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(["llm PackedTokens", "numpy memmap"], [ours_med / 1e6, plain_med / 1e6], color=["C0", "C7"])
        ax.set_ylabel("M tokens/s (1 thread)")
        ax.set_title(f"causal-LM batches {BATCH}x{SEQ}")
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
        print(f"wrote {path.with_suffix('.png')}")
    return path
