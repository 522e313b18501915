"""`llm compress quantize --algorithm gptq|awq` and `llm compress prune --method sparsegpt | --pattern 2:4`, run
through the command line in process: the files equal what the library functions make from the same calibration
batches, the record names the algorithm, 2:4 masks hold, and bad input is one line naming the --data path, the
layer or the flag."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm import cli, transforms
from llm.compress import awq, gptq, prune, quantize, sparsegpt
from llm.run.compress import calibration_batches
from llm.run.loader import load_model, save_pretrained
from llm.train.distributed import DIST_ENV
from tests.conftest import build

SPEC = dict(
    n_layers=2,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    d_ff=128,
    vocab_size=300,
    mlp="swiglu",
    norm="rmsnorm",
    position="rotary",
    bias=False,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaMA-style model saved with a BPE tokenizer, and windows of 32 tokens of the stdlib's sources."""
    from llm import data as D

    root = tmp_path_factory.mktemp("commands")
    files = [str(p) for p in D.stdlib_files(60_000)]
    tok = D.train_tokenizer(files, root / "tok", kind="bpe", vocab_size=300)
    D.prepare(files, tok, root / "shards", shard_tokens=50_000, val_fraction=0.2)
    torch.manual_seed(0)
    save_pretrained(build(SPEC, max_seq_len=32).eval(), root / "model", tok)
    return root / "model", root / "shards" / "train"


def run(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def first_batches(model_dir, data, n=3, batch_size=2) -> list[dict]:
    model = load_model(model_dir)
    source = calibration_batches(model, str(data), str(model_dir), batch_size)
    return [source.next_batch() for _ in range(n)]


@pytest.mark.parametrize("algorithm, method", [("gptq", "int4"), ("awq", "int4"), ("gptq", "int8")])
def test_calibrated_quantization_writes_what_the_algorithm_makes(tmp_path, setup, algorithm, method):
    model_dir, data = setup
    calibration = ["--data", data, "--calibration-batches", 3, "--batch-size", 2]
    assert run("compress", "quantize", model_dir, tmp_path / "q", "--method", method, "--group-size", 32,
               "--algorithm", algorithm, *calibration) == 0  # fmt: skip
    reference = (gptq if algorithm == "gptq" else awq).quantize_model(
        load_model(model_dir).eval(), first_batches(model_dir, data), method, 32
    )
    written, expected = load_file(tmp_path / "q" / "model.safetensors"), transforms.plain_state(reference)
    assert written.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(written[name], t), name
    saved = load_model(tmp_path / "q")
    assert saved.transforms == [{"name": "quantize", "method": method, "group_size": 32, "algorithm": algorithm}]
    rtn = copy.deepcopy(load_model(model_dir))
    quantize.apply(rtn, quantize.QuantizeSettings(method, 32))
    qkv = "transformer.blocks.0.attn.qkv.weight.qdata"
    assert not torch.equal(written[qkv], rtn.state_dict()[qkv])  # the integers are the algorithm's, not RTN's


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_of_four_through_the_command(tmp_path, setup, method):
    model_dir, data = setup
    assert run("compress", "prune", model_dir, tmp_path / "p", "--method", method, "--pattern", "2:4",
               "--data", data, "--calibration-batches", 3, "--batch-size", 2) == 0  # fmt: skip
    pruned = load_model(tmp_path / "p")
    for name, m in prune.prunable_linears(pruned):
        zeros = (m.weight.reshape(m.out_features, -1, 4) == 0).sum(-1)
        assert (zeros == 2).all(), name
    if method == "sparsegpt":
        reference = load_model(model_dir).eval()
        sparsegpt.prune_model(reference, first_batches(model_dir, data), pattern="2:4")
        for (name, m), (_, r) in zip(prune.prunable_linears(pruned), prune.prunable_linears(reference)):
            assert torch.equal(m.weight, r.weight), name


def test_sparsegpt_half_sparsity(tmp_path, setup):
    model_dir, data = setup
    assert run("compress", "prune", model_dir, tmp_path / "p", "--method", "sparsegpt", "--sparsity", 0.5,
               "--data", data, "--calibration-batches", 3, "--batch-size", 2) == 0  # fmt: skip
    assert prune.sparsity_of(load_model(tmp_path / "p")) == pytest.approx(0.5, abs=1e-3)


def test_a_dead_input_is_a_singular_hessian_that_is_said(tmp_path, setup, capsys):
    """Channels 0-3 of block 0's attention norm are zeroed: attn.qkv's inputs 0-3 are 0 on every token, its
    Hessian is singular; GPTQ says so naming the layer and zeroes those weights, as the reference does."""
    model_dir, data = setup
    model = load_model(model_dir)
    with torch.no_grad():
        model.transformer.blocks[0].attn_norm.weight[:4] = 0
    save_pretrained(model, tmp_path / "dead", model_dir / "tokenizer.json")
    assert run("compress", "quantize", tmp_path / "dead", tmp_path / "q", "--method", "int4", "--group-size", 32,
               "--algorithm", "gptq", "--data", data, "--calibration-batches", 2) == 0  # fmt: skip
    said = "warning: transformer.blocks.0.attn.qkv: 4 of its 64 inputs are 0 on every calibration token"
    assert said in capsys.readouterr().err
    qkv = load_model(tmp_path / "q").transformer.blocks[0].attn.qkv.weight.dequantize()
    assert (qkv[:, :4] == 0).all() and (qkv[:, 4:] != 0).any()


def test_bad_input_is_one_line_naming_what_and_where(tmp_path, setup, capsys):
    model_dir, data = setup
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    narrow = tmp_path / "narrow"
    save_pretrained(build(SPEC, d_model=66, n_heads=3, n_kv_heads=3, max_seq_len=32), narrow)
    out = tmp_path / "out"
    cases = [
        (["quantize", model_dir, out, "--method", "int4", "--algorithm", "gptq"], "gptq: needs calibration data"),
        (["quantize", model_dir, out, "--method", "int4", "--algorithm", "awq", "--data", data,
          "--calibration-batches", 1, "--batch-size", 1], f"{data}: 32 real tokens; at least 128 are needed"),
        (["quantize", model_dir, out, "--method", "int4", "--algorithm", "gptq", "--data", empty], f"{empty}: "),
        (["quantize", model_dir, out, "--method", "int8-dynamic", "--algorithm", "gptq", "--data", data],
         "--algorithm gptq: quantizes weights only"),
        (["prune", model_dir, out, "--method", "sparsegpt", "--sparsity", 0.5], "sparsegpt: needs calibration data"),
        (["prune", model_dir, out, "--sparsity", 1.5], "--sparsity: expected 0 < S < 1, got 1.5"),
        (["prune", model_dir, out, "--sparsity", -0.5], "--sparsity: expected 0 < S < 1, got -0.5"),
        (["prune", model_dir, out, "--sparsity", 0.5, "--pattern", "2:4"], "not both"),
        (["prune", model_dir, out, "--pattern", "4:2"], "--pattern: expected n:m with 0 < n < m"),
        (["prune", narrow, out, "--method", "sparsegpt", "--pattern", "2:4", "--data", data],
         "--pattern 2:4: transformer.blocks.0.attn.qkv's width 66 is not divisible by 4"),
    ]  # fmt: skip
    for argv, message in cases:
        assert run("compress", *argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert not out.exists()


@pytest.mark.distributed
def test_two_ranks_under_torchrun_write_the_one_rank_files(tmp_path, setup):
    """torchrun --nproc_per_node 2 -m llm compress quantize --algorithm gptq: each rank calibrates on half of the
    batches (gloo); rank 0 writes the very bytes the lone command writes."""
    model_dir, data = setup
    argv = ["compress", "quantize", model_dir, None, "--method", "int4", "--group-size", 32, "--algorithm", "gptq",
            "--data", data, "--calibration-batches", 3, "--batch-size", 2]  # fmt: skip
    assert run(*[tmp_path / "one" if a is None else a for a in argv]) == 0
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llm"]
    done = subprocess.run([*launch, *(str(tmp_path / "two" if a is None else a) for a in argv)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "calibrated block 2/2 on 192 tokens over 2 ranks" in done.stderr  # the tokens of both ranks
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
