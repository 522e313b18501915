"""Run a benchmark body on N local CPU ranks (torchrun, gloo) and collect what each rank returns.

`run_on_ranks("llm.bench.memory:measure", ranks, config)` starts
`torchrun --nproc_per_node ranks -m llm.bench.ranks llm.bench.memory:measure CONFIG OUT`;
every rank calls `measure(config)` and writes its dict to OUT.rank<N>.json.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from llm.errors import UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(target: str, ranks: int, config: dict, timeout_s: float = 1800) -> list[dict]:
    """Each rank's result of `target(config)`, in rank order."""
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        cfg_path, out = Path(tmp) / "config.json", Path(tmp) / "out"
        cfg_path.write_text(json.dumps(config))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "llm.bench.ranks", target, str(cfg_path), str(out)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise UserError(f"benchmark ranks of {target} {config} failed:\n{proc.stderr[-3000:]}")
        return [json.loads((out.parent / f"out.rank{r}.json").read_text()) for r in range(ranks)]


def main(argv: list[str]) -> None:
    target, cfg_path, out = argv
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    result = fn(json.loads(Path(cfg_path).read_text()))
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
