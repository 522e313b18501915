"""The global order: exact resume in a new process, ranks and workers partition every epoch,
a different world size continues the same order, blends are deterministic."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from llm.data import Blend, PackedTokens, StatefulLoader, collate_causal_lm
from llm.errors import UserError

SEQ = 16


def window_ids(batch) -> list[int]:
    """Window index of each row (counting shards: window i starts with token i * SEQ)."""
    return (batch["input_ids"][:, 0] // SEQ).tolist()


def check_windows(batch):
    x, y = batch["input_ids"], batch["labels"]
    start = x[:, :1]
    assert torch.equal(x, start + torch.arange(SEQ)) and torch.equal(y, start + 1 + torch.arange(SEQ))


def take(loader, n):
    out = []
    for batch in loader:
        check_windows(batch)
        out.append(window_ids(batch))
        if len(out) == n:
            break
    return out


def test_windows_pack_across_documents_and_shards(counting_shards):
    ds = PackedTokens(counting_shards, SEQ)
    assert ds.num_samples == (10_000 - 1) // SEQ and len(ds) == ds.num_samples
    rows = torch.stack(list(ds))
    assert sorted((rows[:, 0] // SEQ).tolist()) == list(range(ds.num_samples))
    assert torch.equal(rows - rows[:, :1], torch.arange(SEQ + 1).expand_as(rows))


def test_order_depends_only_on_seed_and_epoch(counting_shards):
    a, b, c = (PackedTokens(counting_shards, SEQ, seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.order(0), b.order(0)) and not np.array_equal(a.order(0), c.order(0))
    assert not np.array_equal(a.order(0), a.order(1))


RESUME = textwrap.dedent(
    """
    import json, sys
    from llm.data import PackedTokens, collate_causal_lm, StatefulLoader
    path, state, workers, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    loader = StatefulLoader(PackedTokens(path, 16, seed=7, rank=1, world_size=2), 5, collate_causal_lm, workers)
    loader.load_state_dict(state)
    out = []
    for batch in loader:
        out.append((batch["input_ids"][:, 0] // 16).tolist())
        if len(out) == n:
            break
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_matches_an_uninterrupted_run(counting_shards, workers):
    def rank1():
        return PackedTokens(counting_shards, SEQ, seed=7, rank=1, world_size=2)

    full = take(StatefulLoader(rank1(), 5, collate_causal_lm), 14)
    loader = StatefulLoader(rank1(), 5, collate_causal_lm, workers)
    first = take(loader, 6)  # with workers, batches 7.. are already prefetched and must not count
    state = loader.state_dict()
    assert state["consumed"] == 6 * 5 * 2 and state["epoch"] == 0
    proc = subprocess.run(
        [sys.executable, "-c", RESUME, str(counting_shards), json.dumps(state), str(2 - workers // 2), "8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert first + json.loads(proc.stdout) == full


@pytest.mark.parametrize("world_size,workers", [(2, 0), (4, 0), (2, 2)])
def test_ranks_partition_the_epoch(counting_shards, world_size, workers):
    n = PackedTokens(counting_shards, SEQ).num_samples
    per_rank = []
    for rank in range(world_size):
        ds = PackedTokens(counting_shards, SEQ, seed=1, rank=rank, world_size=world_size)
        ids = [i for b in take(StatefulLoader(ds, 8, collate_causal_lm, workers), 10**6) for i in b]
        assert len(ids) == len(ds) == n // world_size
        per_rank.append(ids)
    union = [i for ids in per_rank for i in ids]
    assert len(set(union)) == len(union)  # no duplicate
    tail = n % world_size  # a tail shorter than one row goes first in the next pass
    assert len(union) == n - tail
    # ... and the next pass picks the tail up: over two passes nothing is lost
    ds = PackedTokens(counting_shards, SEQ, seed=1, rank=0, world_size=world_size)
    ds.position = (n // world_size) * world_size
    second = [ds.sample_at(ds.position + r) for r in range(tail)]
    assert sorted(union + [int(w[0]) // SEQ for w in second]) == list(range(n))


def test_resume_from_four_ranks_onto_two_continues_the_global_order(counting_shards):
    single = PackedTokens(counting_shards, SEQ, seed=5)
    global_order = [single.index_at(p) for p in range(single.num_samples)]
    four = [
        StatefulLoader(PackedTokens(counting_shards, SEQ, seed=5, rank=r, world_size=4), 3, collate_causal_lm)
        for r in range(4)
    ]
    iters = [iter(loader) for loader in four]
    seen = [[] for _ in range(4)]
    for _ in range(5):
        for r, it in enumerate(iters):
            seen[r] += window_ids(next(it))
    state = four[0].state_dict()
    assert state["consumed"] == 5 * 3 * 4
    # ranks interleave: global position 4k + r went to rank r
    assert [seen[p % 4][p // 4] for p in range(60)] == global_order[:60]
    two = []
    for r in range(2):
        loader = StatefulLoader(PackedTokens(counting_shards, SEQ, seed=5, rank=r, world_size=2), 3, collate_causal_lm)
        loader.load_state_dict(state)
        two.append([i for b in take(loader, 4) for i in b])
    assert [two[p % 2][p // 2] for p in range(24)] == global_order[60:84]


def test_next_epoch_reshuffles_and_state_counts_epochs(counting_shards):
    ds = PackedTokens(counting_shards, SEQ, seed=2)
    first = [int(w[0]) for w in ds]
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["consumed"] == 0
    second = [int(w[0]) for w in ds]
    assert sorted(first) == sorted(second) and first != second


def test_state_from_another_dataset_is_refused(counting_shards):
    ds = PackedTokens(counting_shards, SEQ, seed=2)
    with pytest.raises(UserError, match="seed"):
        ds.load_state_dict({"epoch": 0, "consumed": 3, "seed": 9, "num_samples": ds.num_samples})
    with pytest.raises(UserError, match="rank"):
        PackedTokens(counting_shards, SEQ, rank=2, world_size=2)


def test_blend_follows_weights_deterministically_and_resumes(counting_shards):
    def blend(rank=0, world=1):
        a = PackedTokens(counting_shards, SEQ, seed=1)
        b = PackedTokens(counting_shards, 2 * SEQ, seed=2)
        return Blend([(a, 3.0), (b, 1.0)], seed=11, rank=rank, world_size=world)

    samples = [len(s) for s in blend()]
    assert abs(samples.count(SEQ + 1) / len(samples) - 0.75) < 0.01
    ref = [tuple(s[:2].tolist()) for s in blend()]
    again = blend()
    it = iter(again)
    head = [tuple(next(it)[:2].tolist()) for _ in range(100)]
    resumed = blend()
    resumed.load_state_dict(again.state_dict())
    tail = [tuple(s[:2].tolist()) for s in resumed]
    assert head + tail == ref


def test_pickled_reader_reopens_its_files_and_keeps_its_position(counting_shards):
    import pickle

    ds = PackedTokens(counting_shards, SEQ, seed=3)
    ds.position = 17
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the memory maps are not copied into the pickle
    copy = pickle.loads(blob)
    assert copy.position == 17 and torch.equal(copy.sample_at(40), ds.sample_at(40))


def test_documents_strip_eos_and_skip_short_ones(tmp_path):
    from llm.data import Documents
    from llm.data.prepare import write_token_shards

    docs = [[5, 6, 7, 0], [8, 0], [9, 9, 0], [3, 4, 5, 6, 0]]
    write_token_shards(tmp_path, docs, vocab_size=16, tokenizer_info={"eos_id": 0}, shard_tokens=5)
    got = sorted(Documents(tmp_path, min_tokens=2).get(i).tolist() for i in range(3))
    assert got == [[3, 4, 5, 6], [5, 6, 7], [9, 9]]
    assert Documents(tmp_path).num_samples == 4
