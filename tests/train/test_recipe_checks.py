"""Everything about a recipe is checked before any process group: files, vocabularies, batch arithmetic
for the launcher's world size, blends, a resume's checkpoint; `--set` takes several pairs, `--dry-run`
prints the resolved recipe and the DeepSpeed JSON."""

import copy
import json

import numpy as np
import pytest
import yaml

from llm.cli import main
from llm.config import ConfigError
from llm.run.checks import check_resume
from llm.run.recipe import resolve_recipe
from llm.run.train import check_recipe
from tests.train.helpers import TINY, run, write_recipe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 300-id BPE tokenizer and two shard directories made with it: text/ and code/."""
    from llm.data import prepare, train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    files = {}
    for name, line in (("text", "the cat sat on the mat. "), ("code", "def f(x): return x + 1\n")):
        (root / f"{name}.txt").write_text(line * 400)
        files[name] = root / f"{name}.txt"
    tok = train_tokenizer(list(files.values()), root / "tok", vocab_size=300)
    for name, path in files.items():
        prepare([path], tok, root / name, workers=1)
    return root


def shard_recipe(corpus, **data):
    recipe = copy.deepcopy(TINY)
    recipe["model"]["vocab_size"] = 300
    recipe["data"] = {"train": str(corpus / "text" / "train"), "tokenizer": str(corpus / "tok"), "seq_len": 16,
                      **data}  # fmt: skip
    return recipe


def check(recipe: dict):
    return check_recipe(resolve_recipe(recipe))


def test_a_recipe_with_shards_and_its_tokenizer_passes(corpus):
    assert check(shard_recipe(corpus)).name == "causal_lm"


def test_missing_tokenizer_is_named_with_the_one_the_shards_were_made_with(corpus, tmp_path):
    recipe = shard_recipe(corpus, tokenizer=str(tmp_path / "nope" / "tokenizer.json"))
    recipe["logging"] = {"sample_prompt": "def "}
    with pytest.raises(ConfigError, match=r"^data.tokenizer: .*nope/tokenizer.json: tokenizer file not found; "
                                          r"the shards were made with .*tok/tokenizer.json"):  # fmt: skip
        check(recipe)


def test_tokenizer_larger_than_the_model_vocabulary(corpus):
    from llm.data import Tokenizer

    size = Tokenizer(corpus / "tok").vocab_size
    recipe = shard_recipe(corpus)
    recipe["model"]["vocab_size"] = size - 1
    with pytest.raises(ConfigError, match=rf"^model.vocab_size: {size - 1} is smaller than the tokenizer's {size} ids"):
        check(recipe)


def test_shards_beyond_the_model_vocabulary(corpus):
    recipe = shard_recipe(corpus, tokenizer=None)
    recipe["model"]["vocab_size"] = 257
    with pytest.raises(ConfigError, match=r"^data.train: .*vocabulary of \d+ ids, the model has 257"):
        check(recipe)


def test_missing_shard_directories_are_named(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"^data.val: .*no such directory"):
        check(shard_recipe(corpus, val=str(tmp_path / "val")))
    with pytest.raises(ConfigError, match=r"^data.train: .*no such directory and data.prepare is not set"):
        check(shard_recipe(corpus, train=str(tmp_path / "train")))
    blend = [{"path": str(corpus / "text" / "train")}, {"path": str(tmp_path / "gone"), "weight": 2}]
    with pytest.raises(ConfigError, match=r"^data.train\[1\].path: .*gone: no such directory"):
        check(shard_recipe(corpus, train=blend))


def test_prepare_will_make_the_tokenizer_and_shards(tmp_path):
    recipe = copy.deepcopy(TINY)
    recipe["model"]["vocab_size"] = 512
    recipe["data"] = {"train": str(tmp_path / "d" / "train"), "tokenizer": str(tmp_path / "d" / "tokenizer.json"),
                      "seq_len": 16, "prepare": {"vocab_size": 512}}  # fmt: skip
    check(recipe)
    recipe["data"]["prepare"]["vocab_size"] = 1024
    with pytest.raises(ConfigError, match=r"^data.prepare.vocab_size: 1024 tokens do not fit model.vocab_size=512"):
        check(recipe)


def test_global_batch_uses_the_launchers_world_size(monkeypatch):
    recipe = copy.deepcopy(TINY)
    recipe["train"] = dict(TINY["train"], micro_batch_size=4, grad_accum=2, global_batch_size=16)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"^train.global_batch_size: 16 != .* x 1 ranks = 8"):
        check(recipe)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check(recipe)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"x 3 ranks = 24"):
        check(recipe)


def test_unknown_preset_fails_in_the_check():
    recipe = dict(TINY, deepspeed={"preset": "zero9"})
    with pytest.raises(ConfigError, match=r"^deepspeed.preset: 'zero9' is neither a file nor a preset"):
        check(recipe)


def test_set_takes_several_pairs_and_dry_run_prints_recipe_and_deepspeed_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = write_recipe(tmp_path / "r.yaml", dict(TINY, run_dir=str(tmp_path / "run")))
    argv = ["pretrain", str(path), "--set", "train.max_steps=7", "seed=5", "--set", "train.grad_accum=3",
            "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    head, _, ds = out.partition("# DeepSpeed config (2 ranks)\n")
    recipe = yaml.safe_load(head)
    assert (recipe["train"]["max_steps"], recipe["seed"], recipe["train"]["grad_accum"]) == (7, 5, 3)
    assert recipe["model"]["d_model"] == 64 and recipe["model"]["family"] == "gpt"  # resolved from the preset
    ds = json.loads(ds)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
    assert not (tmp_path / "run").exists()  # nothing written


def test_blend_recipe_reads_both_directories_by_weight(corpus):
    from llm.data import Blend, PackedTokens
    from llm.tasks import get_task

    blend = [{"path": str(corpus / "text" / "train"), "weight": 3}, {"path": str(corpus / "code" / "train")}]
    recipe = resolve_recipe(shard_recipe(corpus, train=blend))
    check_recipe(recipe)
    batches = get_task("causal_lm").batches(recipe.model, recipe.data, "train", 1, 4, 0, 1)
    stream = batches.loader.dataset
    assert isinstance(stream, Blend) and [d.path for d in stream.datasets] == [corpus / "text" / "train",
                                                                                corpus / "code" / "train"]  # fmt: skip
    assert stream.counts.tolist() == [768, 256]

    def vocabulary(name):
        stream = PackedTokens(corpus / name / "train", 16)
        return set(np.concatenate([stream.sample_at(i).numpy() for i in range(stream.num_samples)]).tolist())

    text_ids, code_ids = vocabulary("text"), vocabulary("code")
    windows = np.concatenate([batches.next_batch()["input_ids"].numpy() for _ in range(64)])  # 256 windows
    from_text = [set(w.tolist()) <= text_ids for w in windows]
    from_code = [set(w.tolist()) <= code_ids for w in windows]
    assert all(t != c for t, c in zip(from_text, from_code))  # each window comes from exactly one directory
    assert np.mean(from_text) == pytest.approx(0.75, abs=0.08)  # weights 3 : 1


def test_resume_that_changes_a_fixed_field_names_it(tmp_path, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", dict(TINY, run_dir=str(tmp_path / "run")))
    run(path, 1, "train.max_steps=2")
    base = resolve_recipe(dict(TINY, run_dir=str(tmp_path / "run")))
    assert check_resume(base, "auto").name == "step_00000002"
    assert check_resume(base, "none") is None
    for override, message in (
        ({"model": dict(TINY["model"], n_layers=3)}, r"^model.n_layers: is 3 but the checkpoint .*step_00000002 was "
                                                     r"trained with 2; this field cannot change on resume"),
        ({"data": dict(TINY["data"], seq_len=32)}, r"^data.seq_len: is 32 but .* was trained with 16"),
    ):  # fmt: skip
        changed = resolve_recipe(dict(TINY, run_dir=str(tmp_path / "run"), **override))
        with pytest.raises(ConfigError, match=message):
            check_resume(changed, "auto")
    # fields that may change (the optimizer's lr, max_steps) pass; the global batch must stay for the launcher's ranks
    check_resume(resolve_recipe(dict(TINY, run_dir=str(tmp_path / "run"), optim={"lr": 1e-4})), "auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^train.grad_accum: global batch 8 .* x 2 ranks\) differs from the "
                                          r"checkpoint's 4 \(1 ranks\)"):  # fmt: skip
        check_resume(base, "auto")
    # the CLI fails with that line before any process group starts
    path = write_recipe(tmp_path / "r3.yaml", dict(TINY, run_dir=str(tmp_path / "run"),
                                                    model=dict(TINY["model"], n_layers=3)))  # fmt: skip
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["pretrain", str(path), "--dry-run"]) == 2


def test_fine_tuning_files_models_and_teacher_are_checked_before_any_process_group(corpus, tmp_path):
    rows = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in (("the cat", "a"), ("def f", "b")) * 4)
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "other.jsonl").write_text(rows.replace('"b"', '"c"'))
    recipe = shard_recipe(corpus, train=str(tmp_path / "train.jsonl"))
    recipe["task"] = "text_classification"
    assert check(recipe).options.labels == ["a", "b"]  # an example file where shards would be, labels from it
    with pytest.raises(ConfigError, match=r"^data.train: .*gone.jsonl: no such file or directory"):
        check(dict(recipe, data=dict(recipe["data"], train=str(tmp_path / "gone.jsonl"))))
    with pytest.raises(ConfigError, match=r"^data.tokenizer: needed to tokenize .*train.jsonl"):
        check(dict(recipe, data=dict(recipe["data"], tokenizer=None)))
    blend = [{"path": str(tmp_path / "train.jsonl")}, {"path": str(tmp_path / "other.jsonl")}]
    with pytest.raises(ConfigError, match=r"^data.train\[1\].path: .*other.jsonl: labels \['a', 'c'\] differ"):
        check(dict(recipe, data=dict(recipe["data"], train=blend)))
    with pytest.raises(ConfigError, match=r"^init_from: .*nowhere: not found"):
        check(dict(recipe, init_from=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^distill.teacher: .*empty"):
        check(dict(shard_recipe(corpus), distill={"teacher": str(tmp_path / "empty")}))
