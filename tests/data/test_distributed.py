"""Two real processes with torch.distributed (gloo): each reads its own rank's share; gathered,
the shares are one epoch with no duplicate and no gap, and both ranks hold the same state."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm.data import PackedTokens, StatefulLoader, collate_causal_lm

SEQ = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = StatefulLoader(PackedTokens(path, SEQ, seed=9, rank=rank, world_size=world), 8, collate_causal_lm)
        ids = [int(i) for b in loader for i in b["input_ids"][:, 0] // SEQ]
        gathered = [None] * world
        dist.all_gather_object(gathered, {"ids": ids, "state": loader.state_dict()})
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_share_one_epoch(counting_shards, tmp_path):
    out = tmp_path / "gathered.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(counting_shards), str(out)), nprocs=2, join=True)
    gathered = torch.load(out, weights_only=True)
    n = PackedTokens(counting_shards, SEQ).num_samples
    union = gathered[0]["ids"] + gathered[1]["ids"]
    assert len(union) == len(set(union)) == n - n % 2
    epoch, consumed = divmod(n - n % 2, n)
    expected = {"epoch": epoch, "consumed": consumed, "seed": 9, "num_samples": n}
    assert gathered[0]["state"] == gathered[1]["state"] == expected
