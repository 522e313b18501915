"""Pruning: structured removal of zero heads/neurons leaves outputs unchanged and shrinks the model,
pruned models reload bit-identically, magnitude and Wanda remove what their scores say."""

import copy

import numpy as np
import pytest
import torch

from llm.compress import prune
from llm.errors import UserError
from llm.models.generation import generate
from llm.run.loader import load_model, save_pretrained
from tests.conftest import build, rel_err

SPECS = {
    "mha-gelu": dict(n_layers=2, d_model=64, n_heads=4, d_ff=96, vocab_size=100, max_seq_len=32),
    "gqa-swiglu-rope": dict(
        n_layers=3, d_model=64, n_heads=8, n_kv_heads=4, d_ff=80, vocab_size=100, max_seq_len=32,
        mlp="swiglu", norm="rmsnorm", position="rotary", bias=False,
    ),
}  # fmt: skip


@torch.no_grad()
def zero_units(model, groups: dict[int, list[int]], neurons: dict[int, list[int]]) -> None:
    """Zero every weight of the given kv groups (with their query heads) and MLP neurons, by hand."""
    for i, block in enumerate(model.transformer.blocks):
        a, m = block.attn, block.mlp
        hd, r = a.head_dim, a.n_heads // a.kv_heads
        q_dim, kv_dim = a.n_heads * hd, a.kv_heads * hd
        for g in groups.get(i, []):
            for h in range(g * r, (g + 1) * r):
                a.qkv.weight[h * hd : (h + 1) * hd] = 0
                a.proj.weight[:, h * hd : (h + 1) * hd] = 0
            for offset in (q_dim, q_dim + kv_dim):
                a.qkv.weight[offset + g * hd : offset + (g + 1) * hd] = 0
            if a.qkv.bias is not None:
                a.qkv.bias.zero_()  # a removed head's bias must be zero too for the outputs to stay
        d_ff = m.fc_out.in_features
        for n in neurons.get(i, []):
            m.fc_in.weight[n] = 0
            if m.kind == "swiglu":
                m.fc_in.weight[d_ff + n] = 0
            if m.fc_in.bias is not None:
                m.fc_in.bias[n] = 0
            m.fc_out.weight[:, n] = 0


@pytest.mark.parametrize("name", SPECS)
def test_removing_zero_heads_and_neurons_changes_nothing_but_the_size(name):
    model = build(SPECS[name]).eval()
    n = model.config.n_layers
    zero_units(model, {i: [i % model.config.kv_heads] for i in range(n)}, {i: [3, 7 + i, 20] for i in range(n)})
    ids = torch.randint(0, 100, (2, 13))
    before, params = model(ids).logits, model.num_parameters()
    prune.prune_structured(model, heads=1, neurons=3)
    assert rel_err(model(ids).logits, before) < 1e-6
    cfg = model.config
    r = cfg.n_heads // cfg.kv_heads
    expected_drop = n * (
        cfg.head_dim * cfg.d_model * (r + 2)  # q heads, k and v rows of one group
        + cfg.head_dim * r * cfg.d_model  # proj columns
        + (cfg.head_dim * (r + 2) if cfg.bias else 0)
        + 3 * cfg.d_model * (3 if cfg.mlp == "swiglu" else 2)
        + (3 if cfg.bias else 0)
    )
    assert params - model.num_parameters() == expected_drop
    assert model.transforms[-1]["heads"] == [cfg.kv_heads - 1] * n


@pytest.mark.parametrize("name", SPECS)
def test_pruned_model_reloads_bit_identical_and_generates_with_its_cache(tmp_path, name):
    model = build(SPECS[name]).eval()
    prune.prune_structured(model, heads=1, neurons=16)
    prune.prune_unstructured(model, 0.5, "magnitude")
    ids = torch.randint(0, 100, (2, 9))
    save_pretrained(model, tmp_path)
    reloaded = load_model(tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert reloaded.num_parameters() == model.num_parameters() < build(SPECS[name]).num_parameters()
    cached = generate(reloaded, ids, max_new_tokens=6, temperature=0.0)
    uncached = generate(reloaded, ids, max_new_tokens=6, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_magnitude_removes_the_smallest_weights_of_each_layer():
    model = build(SPECS["mha-gelu"])
    original = {n: m.weight.detach().numpy().copy() for n, m in prune.prunable_linears(model)}
    prune.prune_unstructured(model, 0.3, "magnitude", "layer")
    for name, m in prune.prunable_linears(model):
        w = original[name]
        k = int(0.3 * w.size)
        dropped = np.argsort(np.abs(w).ravel(), kind="stable")[:k]
        expected = w.ravel().copy()
        expected[dropped] = 0
        assert np.array_equal(m.weight.detach().numpy().ravel(), expected), name


def test_global_scope_uses_one_threshold():
    model = build(SPECS["mha-gelu"])
    everything = np.concatenate([m.weight.detach().abs().numpy().ravel() for _, m in prune.prunable_linears(model)])
    threshold = np.sort(everything)[int(0.4 * everything.size) - 1]
    prune.prune_unstructured(model, 0.4, "magnitude", "global")
    for _, m in prune.prunable_linears(model):
        w = m.weight.detach().numpy()
        assert (np.abs(w[w != 0]) > threshold).all()
    assert abs(prune.sparsity_of(model) - 0.4) < 1e-3


def test_wanda_scores_weights_by_input_norms():
    """Input norms from the hooks equal norms of the inputs captured independently, and Wanda drops,
    per output row, the smallest |W| * ||X|| (numpy reference)."""
    model = build(SPECS["mha-gelu"]).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, 16)), "labels": torch.zeros(2, 16, dtype=torch.long)}]
    captured = {}
    layers = dict(prune.prunable_linears(model))

    def capture(name):
        def hook(module, inputs, output):
            captured[name] = inputs[0].detach().clone()

        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    model(input_ids=batches[0]["input_ids"])
    for h in handles:
        h.remove()
    norms = prune.input_norms(model, batches, 4)
    for name, x in captured.items():
        ref = np.linalg.norm(x.double().numpy().reshape(-1, x.shape[-1]), axis=0)
        assert rel_err(norms[name], torch.from_numpy(ref)) < 1e-12
    original = {n: m.weight.detach().double().numpy().copy() for n, m in layers.items()}
    prune.prune_unstructured(model, 0.5, "wanda", "layer", norms)
    for name, m in layers.items():
        score = np.abs(original[name]) * norms[name].numpy()[None, :]
        k = original[name].shape[1] // 2
        for row in range(score.shape[0]):
            kept = np.sort(np.argsort(score[row], kind="stable")[k:])
            assert np.array_equal(np.flatnonzero(m.weight[row].detach().numpy()), kept)


def test_wanda_counts_real_tokens_only():
    """A BERT classifier calibrated on a padded batch of a 1-word and a 14-word text: the input norms
    and the keep/prune decisions are those of a float64 Wanda over the real tokens, each text run
    alone (locuslab/wanda#79: counting the padding changed 2.6% of the decisions)."""
    spec = dict(family="bert", vocab_size=100, max_seq_len=32, d_model=64, n_layers=2, n_heads=4, d_ff=128)
    spec.update(norm_position="post", mlp="gelu", causal=False, type_vocab_size=2, pooler=True)
    model = build(spec, task="text_classification", num_labels=3).eval()
    texts = [torch.tensor([1, 50, 2]), torch.randint(5, 100, (16,))]  # [CLS] word [SEP]; [CLS] 14 words [SEP]
    ids = torch.zeros(2, 16, dtype=torch.long)
    mask = torch.zeros(2, 16, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : len(t)], mask[i, : len(t)] = t, 1
    norms = prune.input_norms(model, [{"input_ids": ids, "attention_mask": mask}], 1)

    reference = copy.deepcopy(model).double()
    layers = dict(prune.prunable_linears(reference))
    sums = {name: 0.0 for name in layers}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: sums.__setitem__(n, sums[n] + a[0].pow(2).sum((0, 1))))
             for n, m in layers.items()]  # fmt: skip
    with torch.no_grad():
        for t in texts:
            reference(input_ids=t[None])
    for h in hooks:
        h.remove()
    for name in layers:
        assert rel_err(norms[name], sums[name].sqrt()) < 1e-6, name
    want = copy.deepcopy(model)
    prune.prune_unstructured(want, 0.5, "wanda", "layer", {n: v.sqrt() for n, v in sums.items()})
    prune.prune_unstructured(model, 0.5, "wanda", "layer", norms)
    for (name, got), (_, ref) in zip(prune.prunable_linears(model), prune.prunable_linears(want)):
        assert torch.equal(got.weight != 0, ref.weight != 0), name


def test_cubic_schedule_of_zhu_and_gupta():
    values = [prune.cubic_sparsity(t, 0.8, 10, 50) for t in range(0, 60)]
    assert values[10] == 0 and values[50] == values[59] == 0.8
    assert all(a <= b for a, b in zip(values, values[1:]))
    t = 30  # halfway: 0.8 * (1 - 0.5^3)
    assert abs(values[t] - 0.8 * (1 - (1 - (t - 10) / 40) ** 3)) < 1e-12


def test_bad_requests_are_named():
    model = build(SPECS["mha-gelu"])
    with pytest.raises(UserError, match="block 0 has 4 kv groups"):
        prune.prune_structured(model, heads=4)
    with pytest.raises(UserError, match="--structured"):
        prune.parse_structured("heads=two")
    with pytest.raises(UserError, match="wanda needs"):
        prune.prune_unstructured(model, 0.5, "wanda")
    with pytest.raises(UserError, match="sparsity"):
        prune.prune_unstructured(model, 1.0)


def test_gradual_pruning_during_training_reaches_its_sparsity(tmp_path):
    import copy

    from llm.config import ConfigError
    from llm.run.recipe import resolve_recipe
    from llm.run.train import check_recipe
    from tests.train.helpers import TINY, run, write_recipe

    r = copy.deepcopy(TINY)
    r.update(run_dir=str(tmp_path / "run"), deepspeed={"preset": "zero0"})
    r["train"].update(precision="fp32", max_steps=6)
    r["prune"] = {"sparsity": 0.6, "start_step": 1, "end_step": 4, "every": 1}
    run(write_recipe(tmp_path / "r.yaml", r), 1, timeout=400)
    model = load_model(tmp_path / "run" / "export")
    assert abs(prune.sparsity_of(model) - 0.6) < 0.01  # kept through the steps after the schedule ended
    r["deepspeed"] = {"preset": "zero2"}
    with pytest.raises(ConfigError, match="prune.*ZeRO stage 0"):
        check_recipe(resolve_recipe(r))


def test_gradual_pruning_resumes_as_the_run_that_was_not_stopped(tmp_path):
    """Resumed after a pruning step, the pruner keeps its masks (the pruned weights stay zero through
    the next step) and prunes again at the schedule's next step: the masks and every weight end as
    in the run that went through."""
    import copy

    from llm.run.recipe import resolve_recipe
    from tests.train.helpers import TINY, assembled_trainer

    r = copy.deepcopy(TINY)
    r.update(deepspeed={"preset": "zero0"}, checkpoint={"every_steps": 3, "keep_last": 5})
    r["train"].update(precision="fp32", max_steps=6)
    r["prune"] = {"sparsity": 0.6, "start_step": 1, "end_step": 5, "every": 2}  # prunes at steps 1, 3, 5
    through = assembled_trainer(resolve_recipe({**r, "run_dir": str(tmp_path / "through")}))
    through.fit()
    step_3 = tmp_path / "through" / "checkpoints" / "step_00000003"
    resumed = assembled_trainer(resolve_recipe({**r, "run_dir": str(tmp_path / "resumed")}), resume=str(step_3))
    resumed.fit()
    a, b = (next(c for c in t.callbacks if isinstance(c, prune.GradualPruner)) for t in (through, resumed))
    assert a.masks.keys() == b.masks.keys() == dict(prune.prunable_linears(through.model)).keys()
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    for (name, p), q in zip(through.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert abs(prune.sparsity_of(resumed.model) - 0.6) < 0.01


def test_finetuning_starts_from_the_pruned_shapes(tmp_path):
    """init_from a structurally pruned model: the recipe names the original architecture, the
    pruned widths come from the model's record, and the weights are the pruned model's."""
    import copy

    from llm.run.recipe import resolve_recipe
    from llm.run.train import build_model, check_recipe
    from tests.train.helpers import TINY

    spec = {k: v for k, v in TINY["model"].items() if k != "base"}
    pruned = prune.prune_structured(build(spec).eval(), heads=1, neurons=32)
    save_pretrained(pruned, tmp_path / "pruned")
    r = copy.deepcopy(TINY)
    r["init_from"] = str(tmp_path / "pruned")
    recipe = resolve_recipe(r)
    model = build_model(recipe, check_recipe(recipe)).eval()
    ids = torch.randint(0, 256, (2, 10))
    assert model.num_parameters() == pruned.num_parameters()
    assert torch.equal(model(ids).logits, pruned(ids).logits)
    assert model.description()["transforms"] == pruned.description()["transforms"]
