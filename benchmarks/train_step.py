"""One training step (forward, backward, AdamW) of a GPT-2-shaped model: llm against
Hugging Face transformers' GPT2LMHeadModel of the same shape, in the same process.

The two are timed interleaved (llm, HF, HF, llm, ...) so that machine noise hits
both alike; the ratio of medians is printed and written to benchmarks/results/.

    python benchmarks/train_step.py                 # GPT-2 124M shape, batch 4 x 256, fp32
    python benchmarks/train_step.py --layers 6 --seq 128 --steps 6
"""

from __future__ import annotations

import argparse
import time

import torch

from llm.bench.common import format_table, median, write_results
from llm.models.config import ModelConfig
from llm.tasks import build_model


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    return p.parse_args()


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    args = parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        max_seq_len=max(1024, args.seq),
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        d_ff=4 * args.d_model,
    )
    ours = build_model(cfg)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=args.vocab,
            n_positions=cfg.max_seq_len,
            n_embd=args.d_model,
            n_layer=args.layers,
            n_head=args.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    assert ours.num_parameters() == hf.num_parameters(), "the two models must have the same shape"
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    inputs, shifted = ids[:, :-1], ids[:, 1:]

    def step_fn(model, optimizer, forward):
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = forward(model)
            loss.backward()
            optimizer.step()
            return loss.item()

        return step

    runs = {
        "llm": step_fn(
            ours,
            torch.optim.AdamW(ours.parameters(), lr=1e-4),
            lambda m: m(inputs, labels=shifted, return_logits=False).loss,
        ),
        "transformers": step_fn(
            hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), lambda m: m(inputs, labels=inputs).loss
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in runs.values():  # warm-up: allocator, AdamW state
        step(), step()
    for i in range(args.steps):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)

    tokens = args.batch * args.seq
    rows = [
        {
            "model": name,
            "median_s": median(t),
            "min_s": min(t),
            "tokens_per_s": tokens / median(t),
        }
        for name, t in times.items()
    ]
    ratio = median(times["llm"]) / median(times["transformers"])
    print(
        f"GPT-2 shape: {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, "
        f"{ours.num_parameters():,} parameters; batch {args.batch} x {args.seq}, fp32, "
        f"{torch.get_num_threads()} threads, fwd+bwd+AdamW"
    )
    print(format_table(rows))
    print(f"time ratio llm / transformers = {ratio:.3f}  (<= 1.0 means llm is at least as fast)")
    path = write_results(
        "train_step",
        rows,
        args.out,
        config=vars(args),
        parameters=ours.num_parameters(),
        ratio_llm_over_transformers=ratio,
        times=times,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
