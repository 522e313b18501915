"""Layer-by-layer calibration: each block's input statistics equal those of a whole-model forward through the
blocks compressed before it, padding excluded; two ranks sharing the samples give the one-rank result for
GPTQ, AWQ and SparseGPT; on a small trained model GPTQ and AWQ lose less perplexity than RTN at int4 g128."""

import copy
import math
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from llm import adapt, transforms
from llm.compress import awq, calibrate, gptq, quantize, sparsegpt
from llm.errors import UserError
from tests.compress.test_awq import ARCHITECTURES, with_salient_channels
from tests.compress.test_classifier import classifier, padded_batch
from tests.conftest import build, rel_err

warnings.filterwarnings("ignore")


def linear_inputs(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Every block Linear's inputs at the real tokens of `batches`, by whole-model forwards: {name: (n, K)}."""
    found: dict[str, list[torch.Tensor]] = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".blocks." in n]
    for batch in batches:
        real = batch["attention_mask"].bool()
        handles = [
            m.register_forward_pre_hook(
                lambda _, args, n=n, r=real: found.setdefault(n, []).append(args[0][r].double())
            )
            for n, m in linears
        ]
        with torch.no_grad():
            model(**batch)
        for h in handles:
            h.remove()
    return {n: torch.cat(xs) for n, xs in found.items()}


def test_block_statistics_follow_the_compressed_blocks_and_skip_padding():
    """Block 0 is changed when calibrated; block 1's statistics are those of the changed model, block 0's
    those of the original, over the real tokens only."""
    model = classifier().eval()
    original = copy.deepcopy(model)
    batches = [padded_batch(4, 13), padded_batch(3, 9), padded_batch(4, 20), padded_batch(4, 24)]
    recorded = {}

    def compress_block(prefix, block, data):
        recorded.update({f"{prefix}.{n}": s for n, s in data.linear_stats(block).items()})
        if prefix.endswith(".0"):
            block.mlp.fc_in.weight.mul_(0.5)

    calibrate.calibrate(model, batches, compress_block)
    changed, before = linear_inputs(model, batches), linear_inputs(original, batches)
    qkv = "transformer.blocks.1.attn.qkv"
    assert rel_err(changed[qkv], before[qkv]) > 1e-3  # block 1 sees block 0's change
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert recorded.keys() == changed.keys() and len(recorded) == 8
    for name, stats in recorded.items():
        x = (before if ".blocks.0." in name else changed)[name]
        assert stats.tokens == real_tokens == len(x)
        assert rel_err(stats.xtx, x.T @ x) < 1e-6, name
        assert rel_err(stats.mean_abs(), x.abs().mean(0)) < 1e-6, name


def test_soft_prompt_is_refused():
    model = adapt.apply_transform(build(ARCHITECTURES["gpt"][0]), {"name": "prompt", "num_virtual_tokens": 2})
    with pytest.raises(UserError, match="soft prompt or a prefix"):
        calibrate.calibrate(model, [{"input_ids": torch.randint(0, 100, (2, 8))}], lambda *_: None)


LLAMA = ARCHITECTURES["llama-gqa"][0]


def sample_batches() -> list[dict]:
    g = torch.Generator().manual_seed(8)
    return [{"input_ids": torch.randint(0, 100, (3, 16), generator=g)} for _ in range(3)]


def compressed(rank: int = 0, world: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ, AWQ and SparseGPT models from the same start, calibrated on this rank's share of the batches."""
    torch.manual_seed(0)
    start = with_salient_channels(build(LLAMA).eval())
    share = sample_batches()[rank::world]
    results = {
        "gptq": gptq.quantize_model(copy.deepcopy(start), share, "int4", 32),
        "awq": awq.quantize_model(copy.deepcopy(start), share, "int4", 32),
        "sparsegpt": copy.deepcopy(start),
    }
    sparsegpt.prune_model(results["sparsegpt"], share, 0.5)
    return {name: transforms.plain_state(model) for name, model in results.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(compressed(rank, world), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_one(tmp_path):
    """Rank 0 calibrates on batches 0 and 2, rank 1 on batch 1; both end with the one-rank tensors."""
    out = str(tmp_path / "compressed")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    one = compressed()
    for rank in (0, 1):
        shared = torch.load(f"{out}.{rank}", weights_only=True)
        for algorithm, tensors in one.items():
            assert shared[algorithm].keys() == tensors.keys()
            for name, t in tensors.items():
                assert torch.equal(shared[algorithm][name], t), f"rank {rank} {algorithm} {name}"


def test_gptq_and_awq_lose_less_perplexity_than_rtn():
    """A 2-block LLaMA-style model trained for 120 steps on sequences whose token t+1 is a fixed permutation of
    token t-1 (only attention predicts it), given salient activation channels as LLMs have (function kept):
    the perplexity increase at int4 g128 on held-out sequences is smaller for GPTQ and AWQ than for RTN.
    ~5 s on an idle 2-core machine, most of it training."""
    vocab, g = 64, torch.Generator().manual_seed(1)
    permutation = torch.randperm(vocab, generator=g)

    def sample(n: int) -> torch.Tensor:
        x = torch.randint(0, vocab, (n, 17), generator=g)
        for t in range(2, 17):
            x[:, t] = permutation[x[:, t - 2]]
        return x

    torch.manual_seed(1)
    spec = dict(n_layers=2, d_model=128, n_heads=4, d_ff=256, vocab_size=vocab, max_seq_len=32, mlp="swiglu")
    model = build(dict(spec, norm="rmsnorm", position="rotary", bias=False, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for x in sample(120 * 16).split(16):
        loss = model(x[:, :-1], labels=x[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model = with_salient_channels(model.eval())
    held_out, calibration = sample(256), [{"input_ids": x[:, :-1]} for x in sample(128).split(16)]

    @torch.no_grad()
    def perplexity(m):
        return math.exp(m(held_out[:, :-1], labels=held_out[:, 1:]).loss.item())

    base = perplexity(model)
    rtn = perplexity(quantize.apply(copy.deepcopy(model), {"method": "int4", "group_size": 128})) - base
    assert rtn > 0
    assert perplexity(gptq.quantize_model(copy.deepcopy(model), calibration, "int4", 128)) - base < rtn
    assert perplexity(awq.quantize_model(copy.deepcopy(model), calibration, "int4", 128)) - base < rtn
