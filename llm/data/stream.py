"""Streaming readers with one global sample order and an exact, portable position.

Every reader is a `Stream`: `num_samples` items per epoch, visited in a permutation that
depends only on (seed, epoch). Epochs are laid end to end into one endless global order;
the reader's whole state is its `position` in that order (all earlier samples have been
consumed by some rank). Rank r of W takes global positions position + r, position + r + W, ...
so ranks interleave, never overlap and never leave a gap. One pass of `__iter__` runs to the
end of the epoch in which its first row of W samples ends; a tail shorter than W goes first
in the next pass. Because the state is one global position, a run resumes exactly on any
number of ranks, DataLoader workers or batch size.

`StatefulLoader` assembles batches: batch j of a pass is the rank's samples j*B .. j*B+B-1,
built by worker j % num_workers, delivered in order; its `state_dict()` counts only the
batches handed to the caller, so prefetching never loses or repeats samples.
"""

from __future__ import annotations

import inspect as _inspect
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from llm.data import shards as S
from llm.errors import UserError


class Stream(torch.utils.data.IterableDataset):
    """A global order over `num_samples` per epoch; subclasses define `get(index)`."""

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, name: str = ""):
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        if num_samples < 1:
            raise UserError(f"{name}: the dataset holds no samples")
        self.num_samples, self.seed, self.rank, self.world_size, self.name = num_samples, seed, rank, world_size, name
        self.position = 0
        self._order_epoch, self._order = -1, None

    # -- the global order -------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of sample indices for one epoch (cached for the last epoch asked)."""
        if epoch != self._order_epoch:
            dtype = np.uint32 if self.num_samples < 1 << 32 else np.int64
            order = np.arange(self.num_samples, dtype=dtype)
            np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        return int(self.order(epoch)[offset])

    def indices_at(self, positions: list[int]) -> np.ndarray:
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.num_samples)
        if len(epochs) and (epochs == epochs[0]).all():
            return self.order(int(epochs[0]))[offsets]
        return np.array([self.index_at(int(p)) for p in positions], dtype=np.int64)

    def sample_at(self, position: int):
        return self.get(self.index_at(position))

    def samples_at(self, positions: list[int]):
        """The samples at these global positions (a list; readers may return a stacked tensor)."""
        return [self.sample_at(p) for p in positions]

    def get(self, index: int):
        """The sample with this index in the dataset (each reader defines it)."""
        raise NotImplementedError(f"{type(self).__name__} must define get(index)")

    # -- this rank's share ------------------------------------------------------------------------

    def pass_length(self, start: int | None = None) -> int:
        """Rows of W samples in the pass that starts at global position `start`."""
        start = self.position if start is None else start
        n, w = self.num_samples, self.world_size
        end = ((start + w - 1) // n + 1) * n
        return (end - start) // w

    def __len__(self) -> int:
        """This rank's samples in the next pass (num_samples // world_size for a fresh epoch)."""
        return self.pass_length()

    def rank_positions(self, start: int, first: int, count: int) -> list[int]:
        """Global positions of this rank's samples first .. first+count-1 of the pass from `start`."""
        w = self.world_size
        return [start + k * w + self.rank for k in range(first, first + count)]

    def __iter__(self) -> Iterator:
        """This rank's samples of one pass; inside DataLoader workers, worker i takes every i-th.
        (For batches that do not depend on the worker count, use StatefulLoader.)"""
        start, count = self.position, self.pass_length()
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in range(wid, count, nw):
            sample = self.sample_at(start + k * self.world_size + self.rank)
            if info is None:  # handed out = consumed
                self.position = start + (k + 1) * self.world_size
            yield sample
        self.position = start + count * self.world_size

    # -- pickling (spawned DataLoader workers): memory maps are reopened, never copied ------------

    MAPPED: tuple[str, ...] = ()

    def map_files(self) -> None:
        """(Re)open the memory-mapped arrays named in MAPPED."""

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in self.MAPPED}
        state["_order_epoch"], state["_order"] = -1, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.map_files()

    # -- state ------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.position % self.num_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("epoch", "consumed"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise UserError(f"{self.name}: data state field {key!r} must be a non-negative int, got {state}")
        for key in ("seed", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"{self.name}: data state was saved with {key}={state[key]}, this reader has "
                    f"{getattr(self, key)} (a different dataset or seed)"
                )
        self.position = state["epoch"] * self.num_samples + state["consumed"]

    def rewind(self) -> None:
        """Back to the first sample of epoch 0."""
        self.position = 0


class PackedTokens(Stream):
    """Windows of seq_len + 1 tokens cut end to end from the concatenated documents of a shard
    directory (packed across document boundaries), memory-mapped; each an int64 tensor."""

    def __init__(self, path: str | Path, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if seq_len < 1:
            raise UserError(f"seq_len: expected >= 1, got {seq_len}")
        self.path, self.seq_len = Path(path), seq_len
        self.manifest = S.load_manifest(path, kind="tokens")
        self.map_files()
        self.bounds = np.cumsum([0] + [len(v) for v in self.values])
        total = int(self.bounds[-1])
        windows = (total - 1) // seq_len
        if windows < 1:
            raise UserError(f"{self.path}: {total} tokens do not fill one window of {seq_len + 1}")
        super().__init__(windows, seed, rank, world_size, name=str(self.path))

    MAPPED = ("values", "integrity")

    def map_files(self) -> None:
        shards = self.manifest["shards"]
        self.values = [
            S.shard_tokens(self.path / s["file"], s, self.manifest["dtype"], hash_now=False)[0] for s in shards
        ]
        self.integrity = S.BackgroundCheck([(self.path / s["file"], s) for s in shards])

    def tokens(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + length) of the concatenated stream into `out`."""
        shard = int(np.searchsorted(self.bounds, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(self.bounds[shard])
            piece = self.values[shard][local : local + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1

    def get(self, index: int) -> torch.Tensor:
        self.integrity.check()
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        self.tokens(index * self.seq_len, self.seq_len + 1, out)
        return torch.from_numpy(out)

    def samples_at(self, positions: list[int]) -> torch.Tensor:
        """A (len(positions), seq_len + 1) int64 tensor, filled in place."""
        self.integrity.check()
        out = np.empty((len(positions), self.seq_len + 1), dtype=np.int64)
        span, values = self.seq_len + 1, self.values
        single = len(values) == 1
        for row, index in enumerate(self.indices_at(positions)):
            start = int(index) * self.seq_len
            if single:
                out[row] = values[0][start : start + span]
            else:
                self.tokens(start, span, out[row])
        return torch.from_numpy(out)


class Blend(Stream):
    """A deterministic weighted mixture of streams. Blend positions come in blocks of BLOCK; each
    block holds every dataset a fixed number of times (weights rounded by largest remainder) in
    an order shuffled by (seed, block), so the k-th use of a dataset maps to its own k-th global
    position. The sub-streams' own rank settings are ignored: the blend splits ranks itself."""

    BLOCK = 1024

    def __init__(self, datasets: list[tuple[Stream, float]], seed: int = 0, rank: int = 0, world_size: int = 1):
        if not datasets:
            raise UserError("Blend: no datasets given")
        weights = np.array([float(w) for _, w in datasets])
        if (weights < 0).any() or weights.sum() <= 0:
            raise UserError(f"Blend: weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.datasets = [d for d, _ in datasets]
        share = weights / weights.sum() * self.BLOCK
        counts = np.floor(share).astype(np.int64)
        for i in np.argsort(-(share - counts), kind="stable")[: self.BLOCK - counts.sum()]:
            counts[i] += 1
        self.counts = counts
        self._block_id, self._block = -1, None
        super().__init__(sum(d.num_samples for d in self.datasets), seed, rank, world_size, name="Blend")

    def block(self, block_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each slot, how many earlier slots of the block chose the same dataset)."""
        if block_id != self._block_id:
            slots = np.repeat(np.arange(len(self.counts)), self.counts)
            np.random.default_rng([self.seed, 1 << 20, block_id]).shuffle(slots)
            rank_in = np.zeros(len(slots), dtype=np.int64)
            seen = np.zeros(len(self.counts), dtype=np.int64)
            for i, d in enumerate(slots):
                rank_in[i] = seen[d]
                seen[d] += 1
            self._block_id, self._block = block_id, (slots, rank_in)
        return self._block

    def sample_at(self, position: int):
        block_id, offset = divmod(position, self.BLOCK)
        slots, rank_in = self.block(block_id)
        d = int(slots[offset])
        return self.datasets[d].sample_at(block_id * int(self.counts[d]) + int(rank_in[offset]))


class Documents(Stream):
    """Whole documents (EOS stripped) of a token shard directory in the global order: the
    document-level reader under sentence pairs (NSP) and span pairs (contrastive). Documents
    shorter than `min_tokens` are left out of the order (a pair needs two pieces)."""

    def __init__(self, path: str | Path, seed: int = 0, rank: int = 0, world_size: int = 1, min_tokens: int = 1):
        self.path = Path(path)
        self.manifest = S.load_manifest(path, kind="tokens")
        self.eos_id = self.manifest["tokenizer"].get("eos_id")
        self.map_files()
        starts, ends = [], []
        for s in self.manifest["shards"]:
            offsets = S.shard_tokens(self.path / s["file"], s, self.manifest["dtype"])[1]
            starts.append(offsets[:-1].astype(np.int64))
            ends.append(offsets[1:].astype(np.int64))
        self.doc_shard = np.concatenate([np.full(len(st), i, dtype=np.int32) for i, st in enumerate(starts)])
        self.doc_start, self.doc_end = np.concatenate(starts), np.concatenate(ends)
        if self.eos_id is not None:  # strip the EOS prepare appended
            ends_eos = [
                (e > b) & (v[np.maximum(e - 1, 0)] == self.eos_id) if len(v) else np.zeros(len(e), dtype=bool)
                for v, b, e in zip(self.values, starts, ends)
            ]
            self.doc_end = self.doc_end - np.concatenate(ends_eos)
        self.doc_ids = np.flatnonzero(self.doc_end - self.doc_start >= min_tokens)
        super().__init__(len(self.doc_ids), seed, rank, world_size, name=str(self.path))

    MAPPED = ("values", "integrity")

    def map_files(self) -> None:
        shards = self.manifest["shards"]
        self.values = [
            S.shard_tokens(self.path / s["file"], s, self.manifest["dtype"], hash_now=False)[0] for s in shards
        ]
        self.integrity = S.BackgroundCheck([(self.path / s["file"], s) for s in shards])

    def document(self, doc: int) -> np.ndarray:
        """Tokens of document `doc` (an index among all documents of the directory)."""
        self.integrity.check()
        return self.values[self.doc_shard[doc]][self.doc_start[doc] : self.doc_end[doc]]

    def get(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.document(int(self.doc_ids[index])).astype(np.int64))

    def rng(self, position: int, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt, position])


class SentencePairs(Documents):
    """BERT's next-sentence pairs. Each document in the global order is cut at a random point
    into segment A (before) and B (after); with probability 1/2 B is replaced by a span of
    another random document. Samples: {"a", "b", "next_sentence_label"} (0: B follows A,
    1: B is random, as Hugging Face). Each segment holds at most max_tokens // 2 tokens.
    Randomness is seeded by the global position, so resuming reproduces it."""

    def __init__(self, path, max_tokens: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if max_tokens < 5:
            raise UserError(f"max_tokens: expected >= 5 ([CLS] A [SEP] B [SEP]), got {max_tokens}")
        super().__init__(path, seed, rank, world_size, min_tokens=2)
        if self.num_samples < 2:
            raise UserError(f"{self.path}: sentence pairs need at least two documents of 2+ tokens")
        self.half = (max_tokens - 3) // 2

    def sample_at(self, position: int) -> dict:
        rng = self.rng(position, 1)
        doc = int(self.doc_ids[self.index_at(position)])
        tokens = self.document(doc)
        cut = int(rng.integers(1, len(tokens)))
        a = tokens[max(0, cut - self.half) : cut]
        if rng.random() < 0.5:
            b, label = tokens[cut : cut + self.half], 0
        else:
            other = int(rng.integers(self.num_samples - 1))
            other = int(self.doc_ids[other + (other >= self.doc_ids.searchsorted(doc))])
            other_tokens = self.document(other)
            start = int(rng.integers(0, max(1, len(other_tokens) - self.half + 1)))
            b, label = other_tokens[start : start + self.half], 1
        return {
            "a": torch.from_numpy(a.astype(np.int64)),
            "b": torch.from_numpy(b.astype(np.int64)),
            "next_sentence_label": label,
        }


class SpanPairs(Documents):
    """Two random spans of one document (positives for contrastive learning; the other pairs
    of the batch are the negatives). Samples: {"a", "b"}, each of at most span_tokens tokens."""

    def __init__(self, path, span_tokens: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if span_tokens < 1:
            raise UserError(f"span_tokens: expected >= 1, got {span_tokens}")
        super().__init__(path, seed, rank, world_size, min_tokens=2)
        self.span_tokens = span_tokens

    def sample_at(self, position: int) -> dict:
        rng = self.rng(position, 2)
        tokens = self.document(int(self.doc_ids[self.index_at(position)]))
        length = min(self.span_tokens, max(1, len(tokens) // 2))
        starts = rng.integers(0, len(tokens) - length + 1, size=2)
        a, b = (tokens[s : s + length].astype(np.int64) for s in starts)
        return {"a": torch.from_numpy(a), "b": torch.from_numpy(b)}


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


def _takes_generator(fn: Callable) -> bool:
    try:
        return "generator" in _inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _PassBatches(torch.utils.data.IterableDataset):
    """The batches of one pass of a stream; worker i builds batches i, i + W, ..."""

    def __init__(self, stream: Stream, start: int, count: int, micro_batch_size: int, collate_fn: Callable | None):
        self.stream, self.start, self.count, self.micro_batch_size, self.collate_fn = (
            stream,
            start,
            count,
            micro_batch_size,
            collate_fn,
        )
        self.random = collate_fn is not None and _takes_generator(collate_fn)

    def batch(self, j: int):
        first = j * self.micro_batch_size
        size = min(self.micro_batch_size, self.count - first)
        samples = self.stream.samples_at(self.stream.rank_positions(self.start, first, size))
        if self.collate_fn is None:
            return samples
        if self.random:  # randomness seeded by the batch's place in the global order: resumable
            position = self.start + first * self.stream.world_size + self.stream.rank
            seed = np.random.SeedSequence([self.stream.seed, position]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(seed) >> 1)
            return self.collate_fn(samples, generator=generator)
        return self.collate_fn(samples)

    def __len__(self) -> int:
        return -(-self.count // self.micro_batch_size)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(wid, len(self), nw):
            yield self.batch(j)


class StatefulLoader:
    """Batches of a Stream, optionally built by DataLoader workers, with an exact state.

    Batch j of a pass holds this rank's samples j*B .. j*B+B-1 whatever the number of workers.
    The stream's position advances only when a batch is handed out, so `state_dict()` is exact
    with prefetching. A collate_fn that takes `generator=` gets one seeded by (seed, the batch's
    global position), so random masking is reproduced on resume too.
    """

    def __init__(
        self,
        dataset: Stream,
        micro_batch_size: int,
        collate_fn: Callable | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
    ):
        if micro_batch_size < 1:
            raise UserError(f"micro_batch_size: expected >= 1, got {micro_batch_size}")
        if num_workers < 0:
            raise UserError(f"num_workers: expected >= 0, got {num_workers}")
        self.dataset, self.micro_batch_size, self.collate_fn = dataset, micro_batch_size, collate_fn
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor

    def __len__(self) -> int:
        """Batches in the next pass."""
        return -(-len(self.dataset) // self.micro_batch_size)

    def __iter__(self):
        stream = self.dataset
        start, count = stream.position, stream.pass_length()
        batches = _PassBatches(stream, start, count, self.micro_batch_size, self.collate_fn)
        if self.num_workers == 0:
            source = (batches.batch(j) for j in range(len(batches)))
        else:
            source = torch.utils.data.DataLoader(
                batches,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
            )
        for j, batch in enumerate(source):
            stream.position = start + min((j + 1) * self.micro_batch_size, count) * stream.world_size
            yield batch
        stream.position = start + count * stream.world_size

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


class Batches:
    """This rank's micro-batches of one split as the trainer takes them: `next_batch()`.

    The training split wraps into the next epoch; a validation split ends
    (`next_batch` returns None) after one pass. The position is the stream's.
    """

    def __init__(self, loader: StatefulLoader, wrap: bool):
        self.loader, self.wrap = loader, wrap
        self._iter = None

    def next_batch(self) -> dict | None:
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = None
            if not self.wrap:
                return None
            self._iter = iter(self.loader)
            return next(self._iter)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iter = None

    def rewind(self) -> None:
        """Back to the first sample of the first epoch (validation reads the same samples each time)."""
        self.loader.dataset.rewind()
        self._iter = None
