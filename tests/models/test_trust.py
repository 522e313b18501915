"""A model directory is untrusted input, and a model directory llm writes is replaced whole.

Every file the loader reads is checked against what its role allows, before anything is allocated:
an adapter holds prefix/prompt transforms and exactly their tensors; a description (config.json,
config.yaml) must fit its weights in depth, shapes and dtypes; a pickle holds plain tensors only,
whatever libraries are imported; a weight index or manifest names files of its own directory. A
reader of an output directory sees the old one or the new one, also after a SIGKILL."""

import json
import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm import transforms
from llm.errors import UserError
from llm.fileio import recover_dir
from llm.run.export import export_artifacts
from llm.run.loader import load_model, save_pretrained
from llm.tasks.hf import to_hf
from llm.train import checkpoint as ckpt
from tests.conftest import build
from tests.train.helpers import PYTHON, ROOT, env

TINY = dict(vocab_size=101, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64)


@pytest.fixture
def prefix_export(tmp_path):
    """A Hugging Face directory with a prefix adapter beside it (what `llm finetune` exports)."""
    torch.manual_seed(0)
    model = transforms.apply_transforms(build(TINY), [{"name": "prefix", "num_virtual_tokens": 4}])
    export_artifacts(model, tmp_path / "export")
    return tmp_path / "export"


def set_adapter_transforms(export, records):
    path = export / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["transforms"] = records
    path.write_text(json.dumps(config))


# -- kind 1: every file checked against its role ----------------------------------------------------------

PREFIX = {"name": "prefix", "num_virtual_tokens": 4}


@pytest.mark.parametrize(
    "records, field",
    [
        ([PREFIX, {"name": "lora", "rank": 100_000}], r"transforms\[1\]\.name: expected one of 'prefix', 'prompt'"),
        ([PREFIX, {"name": "prune", "heads": [1, 1]}], r"transforms\[1\]\.name: expected one of 'prefix', 'prompt'"),
        ([{**PREFIX, "num_virtual_tokens": 10**7}], r"transforms\[0\]\.num_virtual_tokens: 10000000 virtual tokens"),
        ([{**PREFIX, "reparameterize": True, "hidden_size": 10**9}], r"do not fit the adapter"),
    ],
    ids=["lora-rank-1e5", "prune", "prefix-1e7-tokens", "prefix-mlp-1e9-wide"],
)
def test_an_adapter_holds_prefix_or_prompt_transforms_its_base_bounds(prefix_export, records, field):
    set_adapter_transforms(prefix_export, records)
    with pytest.raises(UserError, match=r"adapter/adapter_(config\.json|model\.safetensors).*" + field):
        load_model(prefix_export)


def test_damaged_or_missing_adapter_weights_are_named(prefix_export):
    weights = prefix_export / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_model(prefix_export)
    weights.unlink()
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: not found"):
        load_model(prefix_export)


def test_lora_rank_is_bounded_by_the_layers_it_adapts():
    with pytest.raises(UserError, match=r"rank: 33 exceeds the rank of every layer it adapts \(at most 32\)"):
        transforms.apply_transforms(build(TINY), [{"name": "lora", "rank": 33, "targets": ["q", "fc_in"]}])
    transforms.apply_transforms(build(TINY), [{"name": "lora", "rank": 32, "targets": ["q", "fc_in"]}])


def test_a_description_its_weights_do_not_fill_is_refused_before_allocating(tmp_path, monkeypatch):
    from llm.models import fit

    to_hf(build(TINY), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "n_embd": 200_000}))  # 8e11 values
    with pytest.raises(UserError, match=r"attn_norm\.weight has shape \(32,\), config\.json implies \(200000,\)"):
        load_model(tmp_path / "hf")

    save_pretrained(build(TINY), tmp_path / "llm")
    description = tmp_path / "llm" / "config.yaml"
    text = description.read_text()
    description.write_text(text.replace("n_layers: 2", "n_layers: 1000000"))
    with pytest.raises(UserError, match=r"config\.yaml: describes 1000000 layers; its weights hold 2"):
        load_model(tmp_path / "llm")

    description.write_text(text)
    monkeypatch.setattr(fit, "machine_memory", lambda: 10_000)  # what fits its weights must fit the machine too
    with pytest.raises(UserError, match=r"config\.yaml: the model it describes takes 0\.0 GiB, more than"):
        load_model(tmp_path / "llm")


def test_a_tensor_of_another_kind_of_dtype_is_refused(tmp_path):
    save_pretrained(build(TINY), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["transformer.blocks.0.attn.qkv.weight"] = tensors["transformer.blocks.0.attn.qkv.weight"].to(torch.int8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"blocks\.0\.attn\.qkv\.weight holds torch\.int8 values, the model expects"):
        load_model(tmp_path)


def test_a_torchao_tensor_in_pytorch_model_bin_is_refused_though_torchao_is_imported(tmp_path):
    torchao = pytest.importorskip("torchao.quantization")  # importing it registers its tensor subclasses
    to_hf(build(TINY), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    layer = torch.nn.Linear(32, 96)
    torchao.quantize_(layer, torchao.Int8WeightOnlyConfig())
    tensors["transformer.h.0.attn.c_attn.weight"] = layer.weight
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    let_through = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)["transformer.h.0.attn.c_attn.weight"]
    assert type(let_through) is not torch.Tensor  # torch's own weights_only accepts what torchao registered
    with pytest.raises(UserError, match=r"pytorch_model\.bin: refused to load: it holds objects beyond tensors"):
        load_model(tmp_path)


# -- kind 2: an index or manifest names files of its own directory ------------------------------------------


def sharded(path):
    """`path` (a Hugging Face directory) with its weights moved to a shard named by an index."""
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    return tensors


@pytest.mark.parametrize("form", ["../outside/w.safetensors", "absolute", "link"])
def test_a_weight_index_naming_a_file_outside_its_directory_is_refused(tmp_path, form):
    to_hf(build(TINY), tmp_path / "hf")
    tensors = sharded(tmp_path / "hf")
    (tmp_path / "outside").mkdir()
    save_file(tensors, str(tmp_path / "outside" / "w.safetensors"))
    name = {"../outside/w.safetensors": form, "absolute": str(tmp_path / "outside" / "w.safetensors")}.get(form)
    if form == "link":
        name = "w.safetensors"
        (tmp_path / "hf" / name).symlink_to(tmp_path / "outside" / "w.safetensors")
    index = {"metadata": {}, "weight_map": {k: name for k in tensors}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"index\.json: weight_map\[.*\] = .* is not a file of this directory"):
        load_model(tmp_path / "hf")


def test_a_hub_cache_snapshot_whose_shards_link_into_its_blobs_loads(tmp_path):
    """The Hugging Face hub cache keeps files in REPO/blobs/ and links to them from REPO/snapshots/REV/."""
    model = build(TINY)
    snapshot = tmp_path / "models--tiny" / "snapshots" / "abc123"
    to_hf(model, snapshot)
    tensors = sharded(snapshot)
    (tmp_path / "models--tiny" / "blobs").mkdir()
    save_file(tensors, str(tmp_path / "models--tiny" / "blobs" / "f00d"))
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/f00d")
    index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        assert torch.equal(load_model(snapshot)(ids).logits, model(ids).logits)


def test_a_checkpoint_manifest_naming_a_file_outside_its_step_is_refused(tmp_path):
    step = tmp_path / "checkpoints" / ckpt.step_tag(1)
    step.mkdir(parents=True)
    (tmp_path / "secret").write_text("not the checkpoint's")
    ckpt.write_manifest(step, 1)
    manifest = json.loads((step / ckpt.COMPLETE).read_text())
    secret = tmp_path / "secret"
    manifest["files"]["../../secret"] = {"bytes": secret.stat().st_size, "sha256": ckpt._sha256(secret)}
    (step / ckpt.COMPLETE).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=r"'\.\./\.\./secret' is not a file of this checkpoint"):
        ckpt.verify(step)


# -- kind 5: outputs replaced whole -------------------------------------------------------------------------

KILL_WHILE_REMOVING_THE_OLD_EXPORT = """
import os, shutil, signal, sys
from pathlib import Path
import torch
from llm import transforms
from llm.run.export import export_artifacts
from tests.conftest import build
from tests.train.helpers import PYTHON, ROOT, env
from tests.models.test_trust import TINY

real_rmtree = shutil.rmtree
def rmtree(path, *args, **kwargs):  # a SIGKILL half-way through deleting the old export
    path = Path(path)
    if (path / "OLD").exists():
        for f in sorted(path.rglob("*"), reverse=True)[:3]:
            f.unlink() if f.is_file() else f.rmdir()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)
shutil.rmtree = rmtree
torch.manual_seed(1)
model = transforms.apply_transforms(build(TINY), [{"name": "prefix", "num_virtual_tokens": 4}])
export_artifacts(model, Path(sys.argv[1]))
"""


def test_a_kill_while_an_export_is_replaced_leaves_the_old_or_the_new_one(prefix_export):
    (prefix_export / "OLD").write_text("the first export")
    proc = subprocess.run([PYTHON, "-c", KILL_WHILE_REMOVING_THE_OLD_EXPORT, str(prefix_export)], cwd=ROOT, env=env())
    assert proc.returncode == -signal.SIGKILL
    assert not (prefix_export / "OLD").exists()  # the new export, whole
    load_model(prefix_export)
    recover_dir(prefix_export)  # what the next writer does first
    assert sorted(p.name for p in prefix_export.parent.iterdir()) == ["export"]


def test_convert_replaces_a_model_directory_whole_and_never_a_folder_of_other_files(tmp_path):
    from llm.cli import main

    save_pretrained(build(TINY), tmp_path / "model")
    assert main(["convert", str(tmp_path / "model"), str(tmp_path / "out")]) == 0
    assert main(["convert", str(tmp_path / "model"), str(tmp_path / "out"), "--to", "hf"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]  # no config.yaml of the earlier llm directory beside the Hugging Face one

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match=r"notes: exists and holds no config\.yaml or config\.json .* refusing"):
        save_pretrained(build(TINY), tmp_path / "notes")
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["todo.txt"]
