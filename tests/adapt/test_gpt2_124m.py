"""Prefix and prompt tuning move a frozen 124M-parameter GPT-2 (random weights, the gpt2-124m
shape) with under 1% of its parameters trainable: the loss on a fixed batch falls.

The batch draws its tokens from 64 of the 50,257 ids, something only the virtual tokens can
learn here: every weight of the model itself stays as it was."""

import copy

import pytest
import torch

from llm.adapt import apply_transform
from llm.models.config import load_model_config
from llm.tasks import build_model


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = build_model(load_model_config("gpt2-124m"))
    assert model.num_parameters() > 100_000_000
    return model


@pytest.mark.parametrize(
    "spec",
    [{"name": "prefix", "num_virtual_tokens": 16}, {"name": "prompt", "num_virtual_tokens": 16}],
    ids=["prefix", "prompt"],
)
def test_virtual_tokens_lower_the_loss_of_a_frozen_124m_model(spec, base):
    torch.manual_seed(1)
    model = apply_transform(copy.deepcopy(base), dict(spec)).eval()  # eval: no dropout noise in the comparison
    trainable = [p for p in model.parameters() if p.requires_grad]
    fraction = sum(p.numel() for p in trainable) / model.num_parameters()
    assert 0 < fraction < 0.01
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 64, (2, 33), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(trainable, lr=3e-2, weight_decay=0.0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(4):
        loss = model(x, labels=y).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = model(x, labels=y).loss.item()
    assert final < losses[0] - 0.5, (losses, final)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    print(f"{spec['name']}: trainable {fraction:.4%}, loss {losses[0]:.3f} -> {final:.3f}")
