"""Decode speed by CPU time: llm fp32, int8, int4 g32, transformers fp32 and llama.cpp GGUF Q8_0 / Q4_0.

`llm bench decode` reports wall-clock tokens/s. On a machine shared with other jobs (load average above the
core count) a process waits for a core for most of the wall time, and unevenly from call to call, so the wall
figures of one row against another swing by several times. The CPU time a call consumes (process_time: every
thread of this process) is what the call costs; at one thread, tokens / CPU second is the speed a quiet core
would give, as long as the memory bus is not the bound (it is not: every row reaches a fraction of the copy
rate, see `llm bench decode`'s limit column). The same rows, the same runners (llm.bench.inference), batch 1,
a 16-token prompt, 96 greedy new tokens, interleaved round by round after a warm-up round; medians.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/decode_cpu_time.py MODEL_DIR [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llm import transforms
from llm.bench import inference
from llm.bench.common import format_table, write_results
from llm.run.loader import find_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model directory with its tokenizer.json (GGUF holds the tokenizer)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    base = inference.load(args.model, "causal_lm")
    models = {"llm fp32": base}
    for name, (method, group_size) in inference.DECODE_QUANTIZED.items():
        spec = {"name": "quantize", "method": method, "group_size": group_size}
        models[name] = transforms.apply_transform(copy.deepcopy(base), spec)
    prompt = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    job = {"prompt": prompt, "new_tokens": 96}
    with tempfile.TemporaryDirectory(prefix="llm-bench-peers-") as work:
        tokenizer = find_tokenizer(args.model)
        peers, missing = inference.prepare_peers(base, inference.DECODE_PEERS, job, Path(work), tokenizer)
        runners = {**{name: inference.runner(m, job) for name, m in models.items()}, **peers}
        wall: dict[str, list[float]] = {name: [] for name in runners}
        cpu: dict[str, list[float]] = {name: [] for name in runners}
        with torch.no_grad():
            for r in range(args.rounds + 1):
                for name, run in runners.items():
                    started, cpu_started = time.perf_counter(), time.process_time()
                    run()
                    if r:
                        wall[name].append(time.perf_counter() - started)
                        cpu[name].append(time.process_time() - cpu_started)
    base_cpu = statistics.median(cpu["llm fp32"])
    rows = [
        {
            "name": name,
            "cpu_tokens_per_s": job["new_tokens"] / statistics.median(cpu[name]),
            "vs_llm_fp32_cpu": base_cpu / statistics.median(cpu[name]),
            "wall_tokens_per_s": job["new_tokens"] / statistics.median(wall[name]),
        }
        for name in runners
    ]
    headers = {"cpu_tokens_per_s": "tok/CPU s", "vs_llm_fp32_cpu": "vs llm fp32", "wall_tokens_per_s": "wall tok/s"}
    print(format_table(rows, ["name", *headers], headers))
    for name, why in missing.items():
        print(f"{name}: not measured: {why}")
    settings = dict(model=args.model, prompt_tokens=16, new_tokens=96, rounds=args.rounds, batch=1)
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average before {load_before}, after {load['after']}")
    path = write_results("decode_cpu_time", rows, settings=settings, not_measured=missing, load_average=load)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
