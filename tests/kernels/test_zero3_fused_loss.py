"""Under ZeRO-3 the fused loss inside LMHead.forward sees the gathered output projection:
loss and full gradients match float64 torch. One rank, in a child process (it owns a
process group), DeepSpeed on the CPU with gloo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, torch, deepspeed
from deepspeed.utils import safe_get_full_grad
from llm.kernels import reference
from llm.models.layers import LMHead

torch.manual_seed(0)

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(61, 24)
        self.head = LMHead(24, 61, bias=True)
        torch.nn.init.normal_(self.head.weight, std=0.3)
        torch.nn.init.normal_(self.head.bias, std=0.3)

    def forward(self, ids, labels):
        return self.head(self.embed(ids), labels, return_logits=False)[1]

model = Tiny()
ref = {k: v.double() for k, v in model.state_dict().items()}
ids = torch.randint(0, 61, (2, 9))
labels = torch.randint(0, 61, (2, 9))
labels[0, :3] = -100
deepspeed.init_distributed(dist_backend="gloo")
config = {
    "train_batch_size": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    "zero_allow_untested_optimizer": True,
}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
partitioned = model.head.weight.numel() == 0  # outside forward the rank holds no full weight
loss = engine(ids, labels)
engine.backward(loss)
grads = {n: safe_get_full_grad(p).double() for n, p in model.named_parameters()}

leaves = {k: v.clone().requires_grad_() for k, v in ref.items()}
hidden = torch.nn.functional.embedding(ids, leaves["embed.weight"]).flatten(0, 1)
ref_loss = reference.linear_cross_entropy(hidden, leaves["head.weight"], labels.flatten(), leaves["head.bias"])
ref_loss.backward()
errors = {n: ((grads[n] - leaves[n].grad).norm() / leaves[n].grad.norm()).item() for n in grads}
print(json.dumps({"partitioned": partitioned, "loss": loss.item(), "ref_loss": ref_loss.item(), "errors": errors}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_triton_fused_loss_under_zero3_matches_float64():
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DS_ACCELERATOR": "cpu",
        "TRITON_INTERPRET": "1",
        "LLM_KERNELS": "linear_cross_entropy=triton",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["partitioned"]
    assert abs(result["loss"] - result["ref_loss"]) < 1e-5 * abs(result["ref_loss"])
    assert set(result["errors"]) == {"embed.weight", "head.weight", "head.bias"}
    assert all(err < 1e-5 for err in result["errors"].values()), result["errors"]
