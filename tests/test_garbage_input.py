"""Garbage in any file llm reads from a model, adapter, checkpoint or data directory is one line and exit
status 2 for every command that reads it (`llm eval|generate|convert|finetune|compress|distill|data`),
never a traceback.

Each case starts from a valid directory (a Hugging Face export with a prefix adapter and a tokenizer,
its sharded and pytorch_model.bin forms, an llm directory with a LoRA record, a run directory with a
checkpoint, a shard directory) and turns one file into garbage: random bytes, a truncated copy, or
well-formed JSON/YAML of the wrong shape. A checkpoint's manifest is signed again after the change,
as an attacker can, so the file itself is read. The commands run in this process through
`llm.cli.main`; a command that does not need the file may succeed (exit 0)."""

import json
import shutil
import zlib

import numpy as np
import pytest
import yaml

from llm import transforms
from llm.cli import main
from llm.data import train_tokenizer
from llm.data.prepare import write_token_shards
from llm.run.export import export_artifacts
from llm.run.loader import save_pretrained
from llm.run.recipe import resolve_recipe
from llm.run.train import train
from llm.tasks.hf import to_hf
from llm.train import checkpoint as ckpt
from tests.conftest import build

TINY = dict(vocab_size=320, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64)
STEP = f"checkpoints/{ckpt.step_tag(1)}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Valid directories of every kind llm reads, each with its tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    tok = train_tokenizer("stdlib", root / "tok", vocab_size=300, limit_bytes=60_000)
    model = build(TINY)
    prefixed = transforms.apply_transforms(build(TINY), [{"name": "prefix", "num_virtual_tokens": 2}])
    export_artifacts(prefixed, root / "hf", tok)
    to_hf(model, root / "hf-index", tok)
    tensors = (root / "hf-index" / "model.safetensors").rename(root / "hf-index" / "model-00001-of-00001.safetensors")
    names = json.loads(json.dumps({"weight_map": {}}))
    from safetensors import safe_open

    with safe_open(str(tensors), "pt") as f:
        names["weight_map"] = {k: tensors.name for k in f.keys()}
    (root / "hf-index" / "model.safetensors.index.json").write_text(json.dumps(names))
    to_hf(model, root / "hf-bin", tok)
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(root / "hf-bin" / "model.safetensors")), root / "hf-bin" / "pytorch_model.bin")
    (root / "hf-bin" / "model.safetensors").unlink()
    save_pretrained(transforms.apply_transforms(build(TINY), [{"name": "lora", "rank": 2}]), root / "llm", tok)
    rng = np.random.default_rng(0)
    info = {"path": str(tok), "sha256": "x", "eos_id": 0}
    write_token_shards(root / "shards", [rng.integers(0, 300, 40) for _ in range(20)], 320, info, shard_tokens=400)
    recipe = {
        "model": TINY,
        "data": {"source": "synthetic", "seq_len": 16, "tokenizer": str(tok)},
        "train": {"micro_batch_size": 2, "max_steps": 1},
        "logging": {"tensorboard": False, "progress": False},
        "run_dir": str(root / "run"),
    }
    train(resolve_recipe(recipe), resume="none")
    return root


def garbage(path, form: str) -> None:
    data = path.read_bytes()
    if form == "random":  # the same bytes on every run
        path.write_bytes(np.random.default_rng(zlib.crc32(path.name.encode())).bytes(max(64, min(len(data), 4096))))
    elif form == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif form == "wrong-shape":  # well-formed, but not what the file's role holds
        path.write_text("- 1\n- [2]\n" if path.suffix in (".yaml", "") else json.dumps([1, {"weight_map": 2}]))


# (source, file, garbage forms): every file llm reads from each kind of directory
TEXT, BINARY = ("random", "wrong-shape"), ("random", "truncated")
FILES = [
    ("hf", "config.json", TEXT),
    ("hf", "model.safetensors", BINARY),
    ("hf", "generation_config.json", TEXT),
    ("hf", "tokenizer.json", TEXT),
    ("hf", "adapter/adapter_config.json", TEXT),
    ("hf", "adapter/adapter_model.safetensors", BINARY),
    ("hf-index", "model.safetensors.index.json", TEXT),
    ("hf-index", "model-00001-of-00001.safetensors", BINARY),
    ("hf-bin", "pytorch_model.bin", BINARY),
    ("llm", "config.yaml", TEXT),
    ("llm", "model.safetensors", BINARY),
    ("llm", "tokenizer.json", TEXT),
    ("run", "checkpoints/latest", TEXT),
    ("run", f"{STEP}/COMPLETE", TEXT),
    ("run", f"{STEP}/model.yaml", TEXT),
    ("run", f"{STEP}/mp_rank_00_model_states.pt", BINARY),
    ("run", "tokenizer.json", TEXT),
    ("shards", "manifest.json", TEXT),
    ("shards", "shard-00000.arrow", BINARY),
]
# a bad `latest` pointer falls back to the newest intact step (with a warning); a COMPLETE marker that
# is no manifest is an older llm's, accepted unverified: the files they vouch for are read as ever
TOLERATED = ("checkpoints/latest", f"{STEP}/COMPLETE")
CASES = [(source, name, form) for source, name, forms in FILES for form in forms]


def commands(source: str, model, tmp_path, shards) -> dict[str, list[str]]:
    """Every command that reads a directory of kind `source` (a model's or a shard directory), with
    `model` as its model argument."""
    m, out, text = str(model), str(tmp_path / "out"), tmp_path / "text.txt"
    text.write_text("def main():\n    return 1\n" * 20)
    if source == "shards":
        tok = str(shards.parent / "tok" / "tokenizer.json")
        return {
            "data-verify": ["data", "verify", str(shards)],
            "data-inspect": ["data", "inspect", str(shards), "--tokenizer", tok],
            "eval": ["eval", "--model", str(shards.parent / "llm"), "--data", str(shards), "--max-batches", "1"],
        }
    student = {
        "model": TINY,
        "data": {"source": "synthetic", "seq_len": 16, "tokenizer": str(model / "tokenizer.json")},
        "run_dir": str(tmp_path / "student"),
        "distill": {"teacher": m},
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(student))
    finetune = {"init_from": m, "data": {"source": "synthetic", "seq_len": 16}, "run_dir": str(tmp_path / "ft")}
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    report = ["--data", str(shards), "--out", out, "--rounds", "1", "--new-tokens", "2", "--prompt-tokens", "2"]
    return {
        "eval": ["eval", "--model", m, "--data", str(shards), "--max-batches", "1", "--seq-len", "8"],
        "generate": ["generate", "--model", m, "--prompt", "def", "--max-new-tokens", "2"],
        "convert": ["convert", m, out],
        "convert-hf": ["convert", m, out, "--to", "hf"],
        "quantize": ["compress", "quantize", m, out],
        "prune": ["compress", "prune", m, out, "--sparsity", "0.5"],
        "report": ["compress", "report", m, *report, "--max-batches", "1", "--seq-len", "8"],
        "finetune": ["finetune", str(tmp_path / "finetune.yaml"), "--dry-run"],
        "distill": ["distill", str(tmp_path / "distill.yaml"), "--dry-run"],
        "data-prepare": ["data", "prepare", str(text), "--tokenizer", m, "--out", out],
    }


def run(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("source, name, form", CASES, ids=[f"{s}/{n.split('/')[-1]}-{f}" for s, n, f in CASES])
def test_garbage_in_any_file_is_one_line_and_exit_2(sources, tmp_path, capsys, source, name, form):
    model = tmp_path / source
    shutil.copytree(sources / source, model)
    shards = model if source == "shards" else sources / "shards"
    garbage(model / name, form)
    if source == "run" and not name.endswith(("COMPLETE", "latest")):
        ckpt.write_manifest(model / STEP, 1)  # signed again: the file itself is read
    failed = []
    for what, argv in commands(source, model, tmp_path, shards).items():
        rc, err = run(argv, capsys)
        assert rc in (0, 2), (what, rc, err[-5:])
        assert not any("Traceback" in line for line in err), (what, err)
        if rc == 2:
            assert err[-1].startswith("llm: error: ") and sum(e.startswith("llm: error") for e in err) == 1, err
            failed.append(what)
    if name not in TOLERATED:
        assert failed, f"garbage in {source}/{name} went unnoticed by every command"
