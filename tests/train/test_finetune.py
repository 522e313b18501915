"""`llm finetune` end to end: a tiny BERT from an llm model directory and from a Hugging Face
directory, a new classification head, the label map kept with the model, `llm eval` metrics
against scikit-learn, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
import random
import subprocess

import numpy as np
import pytest
import torch
import yaml

from llm.config import ConfigError
from llm.errors import UserError
from tests.conftest import rel_err
from tests.train.helpers import PYTHON, ROOT, env

transformers = pytest.importorskip("transformers")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

WORDS = "the movie film plot actor scene story was is very quite rather a an this".split()
CUES = {"pos": ["great", "wonderful", "superb"], "neg": ["awful", "boring", "dreadful"]}
BERT = dict(family="bert", max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64, norm_position="post")
BERT.update(norm_eps=1e-12, mlp="gelu", causal=False, type_vocab_size=2, pooler=True, tie_embeddings=True)


def sentences(n: int, seed: int) -> list[dict]:
    """Short reviews whose label is given away by one cue word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(WORDS, 4) + [rng.choice(CUES[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Train/val files, a WordPiece tokenizer, an llm BERT directory and a Hugging Face BERT directory."""
    from llm.data.tokenizer import train_tokenizer
    from llm.run.loader import save_pretrained
    from llm.tasks import build_model

    root = tmp_path_factory.mktemp("finetune")
    train, val = sentences(160, 0), sentences(48, 1)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "val.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in val))
    tok = train_tokenizer([str(root / "train.jsonl")], root / "tok", kind="wordpiece", vocab_size=100)
    vocab = json.loads(tok.read_text())["model"]["vocab"]
    cfg = {**BERT, "vocab_size": len(vocab)}
    save_pretrained(build_model(cfg, "masked_lm"), root / "llm-bert", tok)
    hf_cfg = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, type_vocab_size=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(1)
    transformers.BertModel(hf_cfg).save_pretrained(root / "hf-bert")
    (root / "hf-bert" / "tokenizer.json").write_bytes(tok.read_bytes())
    return {"root": root, "train": root / "train.jsonl", "val": root / "val.csv", "val_rows": val}


def recipe(world, name: str, init_from, **extra) -> dict:
    r = {
        "init_from": str(init_from),
        "task": {"name": "text_classification", "pooling": "mean"},
        "data": {"train": str(world["train"]), "val": str(world["val"]), "seq_len": 16},
        "run_dir": str(world["root"] / name),
        "train": {"micro_batch_size": 8, "max_steps": 60, "log_every": 20, "eval_batches": 2},
        "optim": {"lr": 3e-3},
        "deepspeed": {"preset": "zero0"},
        "logging": {"tensorboard": False, "progress": False},
    }
    r.update(extra)
    return r


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PYTHON, "-m", "llm", *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def finetune(world, name: str, r: dict) -> subprocess.CompletedProcess:
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return cli("finetune", str(path))


@pytest.fixture(scope="module")
def from_llm_dir(world):
    """A run that fine-tunes the llm BERT directory for 60 steps (the export and its log)."""
    proc = finetune(world, "from-llm", recipe(world, "from-llm", world["root"] / "llm-bert", adapt={"method": "full"}))
    return world["root"] / "from-llm", proc.stderr


def test_finetune_from_an_llm_directory_learns_the_task(world, from_llm_dir):
    run_dir, log = from_llm_dir
    assert "freshly initialised: classifier.bias, classifier.weight" in log  # the MLM head is not reused
    proc = cli("eval", "--model", str(run_dir / "export"), "--data", str(world["val"]), "--out", str(run_dir / "ev"))
    metrics = dict(kv.split("=") for kv in proc.stdout.splitlines()[0].split())
    assert float(metrics["accuracy"]) > 0.9  # a cue word gives the label away
    assert "true \\ predicted" in proc.stdout and (run_dir / "ev" / "confusion.png").stat().st_size > 0


def test_label_map_and_head_are_restored_on_reload(world, from_llm_dir, tmp_path):
    from llm.run.loader import load_checkpoint_model, load_model
    from llm.tasks.hf import to_hf

    run_dir, _ = from_llm_dir
    model = load_model(run_dir / "export")
    assert model.options.labels == ["neg", "pos"] and model.options.num_labels == 2
    trained = load_checkpoint_model(run_dir / "checkpoints")
    assert torch.equal(model.classifier.weight, trained.classifier.weight)  # the head, not a fresh one
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["task"]["labels"] == ["neg", "pos"]
    # exported as id2label; transformers reads the same classifier back (it pools [CLS]: mean pooling
    # has no transformers architecture, and to_hf refuses it)
    with pytest.raises(UserError, match="has no Hugging Face architecture"):
        to_hf(model, tmp_path / "hf")
    model.options.pooling = model.pooling = "first"
    to_hf(model, tmp_path / "hf")
    ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert ref.config.id2label == {0: "neg", 1: "pos"}
    assert torch.equal(ref.classifier.weight, model.classifier.weight)


def test_eval_metrics_match_scikit_learn_on_predictions_from_transformers(world, from_llm_dir, tmp_path):
    """The reference predictions come from transformers running the exported classifier; scikit-learn scores them."""
    from tokenizers import Tokenizer

    from llm.run.evaluate import evaluate_model
    from llm.tasks.hf import to_hf

    run_dir, _ = from_llm_dir
    from llm.run.loader import load_model

    model = load_model(run_dir / "export")
    model.options.pooling = "first"  # transformers' BertForSequenceClassification pools [CLS]
    model.pooling = "first"
    from llm.run.loader import save_pretrained

    save_pretrained(model, tmp_path / "cls", run_dir / "export" / "tokenizer.json")
    to_hf(model, tmp_path / "hf")
    ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = Tokenizer.from_file(str(run_dir / "export" / "tokenizer.json"))
    truth, predicted = [], []
    with torch.no_grad():
        for row in world["val_rows"]:
            ids = torch.tensor([tok.encode(row["text"]).ids])
            predicted.append(int(ref(input_ids=ids).logits.argmax(-1)))
            truth.append(["neg", "pos"].index(row["label"]))
    result = evaluate_model(model=tmp_path / "cls", data=world["val"], seq_len=16, batch_size=5, out=tmp_path / "ev")
    assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(truth, predicted), abs=1e-12)
    assert result["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(truth, predicted, average="macro"), abs=1e-12)
    assert result["confusion"] == sklearn_metrics.confusion_matrix(truth, predicted, labels=[0, 1]).tolist()
    assert json.loads((tmp_path / "ev" / "confusion.json").read_text())["confusion"] == result["confusion"]


def test_macro_f1_matches_scikit_learn_with_absent_and_never_predicted_classes():
    from llm.tasks.classification import macro_f1

    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.choice([0, 1, 3, 4], size=50)  # class 2 never occurs; some are never predicted
        predicted = np.where(rng.random(50) < 0.6, truth, rng.choice([0, 1, 4], size=50))
        cm = sklearn_metrics.confusion_matrix(truth, predicted, labels=range(5))
        ref = sklearn_metrics.f1_score(truth, predicted, average="macro", zero_division=0)
        assert macro_f1(cm) == pytest.approx(ref, abs=1e-12)


def test_finetune_from_a_hugging_face_directory_with_a_frozen_body(world):
    """adapt: {method: freeze, layers: [trunk]}: the Hugging Face body loads and stays as it was; the head trains."""
    from llm.run.loader import load_model
    from llm.tasks.hf import from_hf

    r = recipe(world, "from-hf", world["root"] / "hf-bert", adapt={"method": "freeze", "layers": ["trunk"]})
    r["task"] = "text_classification"  # pooled [CLS] through BERT's pooler
    r["train"]["max_steps"] = 10
    proc = finetune(world, "from-hf", r)
    assert "init_from" in proc.stderr and "(encoder)" in proc.stderr
    assert "parameters: 66 trainable of " in proc.stderr  # the new head only: 32 x 2 weights + 2 biases
    export = world["root"] / "from-hf" / "export"
    assert (export / "config.json").is_file() and not (export / "adapter").exists()  # Hugging Face; no adapter
    tuned, base = load_model(export), from_hf(world["root"] / "hf-bert")
    assert yaml.safe_load((world["root"] / "from-hf" / "recipe.yaml").read_text())["adapt"]["method"] == "freeze"
    body = {k: v for k, v in base.state_dict().items()}
    for key, value in tuned.state_dict().items():
        if key.startswith(("transformer.", "pooler.")):
            assert torch.equal(value, body[key]), key
    assert tuned.options.labels == ["neg", "pos"]


def test_a_lora_run_exports_the_merged_model_and_a_peft_adapter_for_the_untouched_base(world):
    """RUN_DIR/export of `llm finetune` with LoRA: transformers loads the merged classifier, and
    peft puts export/adapter on the untouched Hugging Face base with the same logits; both equal
    the trained, unmerged model of the final checkpoint."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from llm.run.loader import load_checkpoint_model, load_model

    peft = pytest.importorskip("peft")
    lora = {"method": "lora", "rank": 4, "targets": ["q", "v", "fc_out"], "trainable": ["classifier"]}
    r = recipe(world, "lora", world["root"] / "hf-bert", adapt=lora)
    r["task"] = "text_classification"  # [CLS] through the pooler, as BertForSequenceClassification
    r["train"]["max_steps"] = 10
    finetune(world, "lora", r)
    run_dir = world["root"] / "lora"
    export = run_dir / "export"
    merged = transformers.BertForSequenceClassification.from_pretrained(export).eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    base = transformers.BertForSequenceClassification.from_pretrained(world["root"] / "hf-bert", num_labels=2)
    adapted = peft.PeftModel.from_pretrained(base, export / "adapter").eval()
    trained = load_checkpoint_model(run_dir / "checkpoints").eval()  # the adapters, not merged
    assert trained.transforms[0]["name"] == "lora"
    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    texts = [torch.tensor([tok.encode(row["text"]).ids]) for row in world["val_rows"][:8]]
    exported = load_model(export).eval()

    def logits(model, **kw):  # one text at a time: no padding to line up
        with torch.no_grad():
            return torch.cat([model(input_ids=ids, **kw).logits for ids in texts])

    want = logits(merged)
    assert rel_err(logits(adapted), want) < 1e-5
    assert rel_err(logits(trained), want) < 1e-5
    assert rel_err(logits(exported), want) < 1e-5
    tensors = load_file(str(export / "adapter" / "adapter_model.safetensors"))
    trained_b = [k for k, v in tensors.items() if "lora_B" in k and v.abs().max() > 0]
    assert len(trained_b) == 2 * 3  # q, v and fc_out of both layers moved from B = 0


# ---------------------------------------------------------------------------------------------
# a classifier's label names stay with its head's rows (transformers#10401, optimum#197)
# ---------------------------------------------------------------------------------------------

MNLI = {0: "contradiction", 1: "neutral", 2: "entailment"}  # not sorted: alphabetical order swaps two rows


@pytest.fixture(scope="module")
def mnli(world):
    """A transformers BertForSequenceClassification with MNLI's id2label, and 48 texts labelled with
    the names of its own predictions (so it scores 1.0 on them)."""
    from tokenizers import Tokenizer

    hf_cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, type_vocab_size=2, pad_token_id=0, id2label=MNLI,
        label2id={v: k for k, v in MNLI.items()},
    )  # fmt: skip
    torch.manual_seed(2)
    model = transformers.BertForSequenceClassification(hf_cfg).eval()
    tok = Tokenizer.from_file(str(world["root"] / "hf-bert" / "tokenizer.json"))
    texts = [r["text"] for r in sentences(48, 3)]

    def logits():
        with torch.no_grad():
            return torch.cat([model(input_ids=torch.tensor([tok.encode(t).ids])).logits for t in texts])

    with torch.no_grad():  # spread the predictions over the three classes
        model.classifier.weight.mul_(30)
        model.classifier.bias.sub_(logits().mean(0))
    path = world["root"] / "hf-mnli"
    model.save_pretrained(path)
    (path / "tokenizer.json").write_bytes((world["root"] / "hf-bert" / "tokenizer.json").read_bytes())
    logits = logits()
    rows = [{"text": t, "label": MNLI[int(i)]} for t, i in zip(texts, logits.argmax(-1))]
    assert {r["label"] for r in rows} == set(MNLI.values())
    (world["root"] / "mnli.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": path, "data": world["root"] / "mnli.jsonl", "texts": texts, "logits": logits, "tok": tok}


def mnli_recipe(world, mnli, **task):
    r = recipe(world, "mnli", mnli["model"], task={"name": "text_classification", **task})
    r["data"] = {"train": str(mnli["data"]), "val": str(mnli["data"]), "seq_len": 16}
    return r


def test_init_from_a_classifier_keeps_its_label_names_with_its_rows(world, mnli, tmp_path):
    """Fine-tuning starts from the model's label map, not the data's sorted one: the export reads in
    transformers with MNLI's id2label and the original's logits, and `llm eval` scores 1.0."""
    from llm.run.evaluate import evaluate_model
    from llm.run.export import export_artifacts
    from llm.run.recipe import finetune_recipe
    from llm.run.train import build_model, check_recipe

    r = finetune_recipe(mnli_recipe(world, mnli))
    task = check_recipe(r)
    assert task.options.labels == list(MNLI.values())
    export_artifacts(build_model(r, task).eval(), tmp_path / "export", mnli["model"] / "tokenizer.json")
    ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert ref.config.id2label == MNLI
    with torch.no_grad():
        logits = torch.cat([ref(input_ids=torch.tensor([mnli["tok"].encode(t).ids])).logits for t in mnli["texts"]])
    assert rel_err(logits, mnli["logits"]) < 1e-4  # (fp32 logits near 1e-3)
    assert torch.equal(logits.argmax(-1), mnli["logits"].argmax(-1))
    result = evaluate_model(model=str(tmp_path / "export"), data=str(mnli["data"]), out=str(tmp_path / "ev"))
    assert result["accuracy"] == 1.0 and result["labels"] == list(MNLI.values())


def test_a_recipe_label_order_takes_the_rows_by_name(world, mnli, tmp_path, caplog):
    """The recipe's own order (and a label the model lacks) moves the head's rows by name: the logit
    of each named class is the original's; a new label gets a fresh row."""
    from llm.run.recipe import finetune_recipe
    from llm.run.train import build_model, check_recipe

    order = ["entailment", "contradiction", "neutral", "unrelated"]
    r = finetune_recipe(mnli_recipe(world, mnli, labels=order, num_labels=4))
    with caplog.at_level("INFO", logger="llm"):
        model = build_model(r, check_recipe(r)).eval()
    assert "fresh rows for unrelated" in caplog.text
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([mnli["tok"].encode(t).ids])).logits for t in mnli["texts"]])
    assert rel_err(logits[:, :3], mnli["logits"][:, [2, 0, 1]]) < 1e-4


def test_labels_the_model_lacks_are_the_datas_and_a_teacher_must_name_the_students(world, mnli, tmp_path):
    from llm.run.recipe import finetune_recipe
    from llm.run.train import check_recipe

    rows = [{"text": "a great film", "label": "neutral"}, {"text": "a dull film", "label": "other"}]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = mnli_recipe(world, mnli)
    r["data"]["train"] = str(tmp_path / "other.jsonl")
    assert check_recipe(finetune_recipe(r)).options.labels == ["neutral", "other"]
    r = mnli_recipe(world, mnli, labels=["neutral", "contradiction", "entailment"])
    r["distill"] = {"teacher": str(mnli["model"])}
    with pytest.raises(ConfigError, match=r"^distill\.teacher: .*the teacher's labels \(contradiction, neutral, "):
        check_recipe(finetune_recipe(r))
    del r["task"]["labels"]  # the student takes the teacher's order
    assert check_recipe(finetune_recipe(r)).options.labels == list(MNLI.values())


def test_integer_labels_are_the_rows_of_a_model_without_label_names(world, tmp_path):
    """transformers' unnamed rows (LABEL_0, LABEL_1, ...) are class indices; integer labels read as them."""
    from llm.data.config import DataConfig
    from llm.tasks import build_model, get_task

    rows = [{"text": r["text"], "label": i % 3} for i, r in enumerate(world["val_rows"][:6])]
    (tmp_path / "ints.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task({"name": "text_classification", "num_labels": 3})
    data = DataConfig(train=str(tmp_path / "ints.jsonl"), val=str(tmp_path / "ints.jsonl"))
    data.tokenizer, data.seq_len = str(world["root"] / "hf-bert" / "tokenizer.json"), 16
    cfg = build_model({**BERT, "vocab_size": 100}, task).config
    batch = task.batches(cfg, data, "val", seed=0, micro_batch_size=6, rank=0, world_size=1).next_batch()
    assert sorted(batch["labels"].tolist()) == [0, 0, 1, 1, 2, 2]


def test_eval_loss_is_the_mean_over_examples_as_scikit_learn_gives_it(mnli, tmp_path):
    """10 examples in batches of 4: the loss is log_loss over the 10, not the mean of 3 batch means
    (Lightning#2924); the probabilities come from transformers running the same model."""
    from llm.run.evaluate import evaluate_model

    model = transformers.BertForSequenceClassification.from_pretrained(mnli["model"]).eval()
    with torch.no_grad():  # confident, often wrong: batch losses far apart
        model.classifier.weight.mul_(300)
        model.classifier.bias.mul_(300)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").write_bytes((mnli["model"] / "tokenizer.json").read_bytes())
    texts, names = mnli["texts"][:10], list(MNLI.values())
    truth = [i % 3 for i in range(10)]
    (tmp_path / "ten.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": names[y]}) + "\n" for t, y in zip(texts, truth))
    )
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([mnli["tok"].encode(t).ids])).logits for t in texts])
    probs = torch.softmax(logits.double(), -1).numpy()
    result = evaluate_model(
        model=str(tmp_path / "model"), data=str(tmp_path / "ten.jsonl"), batch_size=4, out=str(tmp_path)
    )
    assert result["batches"] == 3
    # fp32 logits scaled by 300 carry the padded and unpadded forwards' rounding (~1e-5 relative);
    # the mean of 3 batch means (4, 4 and 2 examples) this test guards against is far further off
    assert result["loss"] == pytest.approx(sklearn_metrics.log_loss(truth, probs, labels=[0, 1, 2]), rel=1e-4)
    assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(truth, probs.argmax(-1)), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# bad input: one clear error each
# ---------------------------------------------------------------------------------------------


def resolved(world, r: dict):
    from llm.run.recipe import finetune_recipe
    from llm.run.train import check_recipe

    return check_recipe(finetune_recipe(r))


def test_a_model_section_that_contradicts_init_from_names_the_field(world):
    r = recipe(world, "bad", world["root"] / "llm-bert", model={"d_model": 64})
    with pytest.raises(
        ConfigError, match=r"^model\.d_model: 64 contradicts init_from .*llm-bert, whose model has d_model: 32"
    ):
        resolved(world, r)
    resolved(world, recipe(world, "ok", world["root"] / "llm-bert", model={"d_model": 32, "dropout": 0.1}))


def test_a_checkpoint_of_another_architecture_is_refused(world, tmp_path):
    from llm.run.loader import save_pretrained
    from llm.tasks import build_model

    vit = dict(family="vit", image_size=8, patch_size=4, num_channels=1, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    save_pretrained(build_model(vit, "image_classification"), tmp_path / "vit")
    with pytest.raises(ConfigError, match=r"model\.family: task 'text_classification' needs a gpt or llama or bert"):
        resolved(world, recipe(world, "bad", tmp_path / "vit"))


def test_a_task_the_model_family_cannot_do(world):
    r = recipe(world, "bad", world["root"] / "llm-bert", task="instruction")
    with pytest.raises(ConfigError, match=r"model\.causal: task 'instruction' needs causal: true"):
        resolved(world, r)


def test_mixed_or_missing_labels_in_the_training_file(world, tmp_path):
    rows = [{"text": "great film", "label": "pos"}, {"text": "awful film", "label": 0}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = recipe(world, "bad", world["root"] / "llm-bert")
    r["data"]["train"] = str(tmp_path / "mixed.jsonl")
    with pytest.raises(UserError, match=r"mixed\.jsonl: row 2: label 0 is an integer, row 1's is a string"):
        resolved(world, r)
    (tmp_path / "missing.jsonl").write_text(json.dumps({"text": "great film"}) + "\n")
    r["data"]["train"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match=r"missing\.jsonl: no row has the field 'label'"):
        resolved(world, r)


def test_adapt_section_becomes_a_transform_and_unknown_methods_fail(world):
    from llm.run.recipe import finetune_recipe, recipe_transforms
    from llm.transforms import TRANSFORMS

    r = recipe(world, "x", world["root"] / "llm-bert", adapt={"method": "freeze", "layers": ["embeddings"]})
    r["transforms"] = [{"name": "freeze", "layers": ["blocks.0"]}]
    assert recipe_transforms(finetune_recipe(r)) == [
        {"name": "freeze", "layers": ["blocks.0"]},
        {"name": "freeze", "layers": ["embeddings"]},
    ]
    assert recipe_transforms(finetune_recipe({**r, "adapt": {"method": "full"}})) == r["transforms"]
    with pytest.raises(ConfigError, match=r"^adapt\.method: expected one of 'full', 'lora'|^adapt\.method: expected"):
        finetune_recipe({**r, "adapt": {"method": "dora"}})
    missing = [m for m in ("lora", "prefix", "prompt") if m not in TRANSFORMS]
    for method in missing:  # a method whose transform this checkout lacks
        with pytest.raises(ConfigError, match=rf"adapt\.method: '{method}' is not available here"):
            recipe_transforms(finetune_recipe({**r, "adapt": {"method": method}}))


def test_cli_prints_one_line_for_a_bad_recipe(world):
    r = recipe(world, "bad", world["root"] / "llm-bert", model={"n_layers": 3})
    path = world["root"] / "bad.yaml"
    path.write_text(yaml.safe_dump(r))
    proc = cli("finetune", str(path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"llm: error: model.n_layers: 3 contradicts init_from {world['root'] / 'llm-bert'}, whose model has "
        "n_layers: 2 (a fine-tuning recipe takes the model from init_from; leave model: out)"
    ]


# ---------------------------------------------------------------------------------------------
# the shipped fine-tuning recipes
# ---------------------------------------------------------------------------------------------


def test_the_sentiment_recipe_trains_from_a_bert_directory(world, tmp_path):
    """configs/finetune/sentiment.yaml with a tiny BERT in place of MiniLM and the toy sentences."""
    from llm.run.recipe import load_finetune_recipe
    from tests.train.helpers import assembled_trainer

    sets = [f"init_from={world['root'] / 'llm-bert'}", f"data.train={world['train']}", f"data.val={world['val']}"]
    sets += [f"run_dir={tmp_path / 'run'}", "data.seq_len=16", "train.max_steps=3", "train.eval_every=0"]
    sets += ["train.eval_batches=1", "checkpoint.save_final=false", "logging.progress=false"]
    recipe = load_finetune_recipe(ROOT / "configs" / "finetune" / "sentiment.yaml", sets)
    trainer = assembled_trainer(recipe)
    assert trainer.task.options.labels == ["neg", "pos"] and trainer.task.options.pooling == "mean"
    assert trainer.fit()["steps"] == 3


def test_the_instruction_recipe_trains_from_a_gpt_directory(tmp_path):
    """configs/finetune/instruct.yaml with a tiny GPT in place of the quickstart model."""
    from llm.data.tokenizer import train_tokenizer
    from llm.run.loader import save_pretrained
    from llm.run.recipe import load_finetune_recipe
    from llm.tasks import build_model
    from tests.train.helpers import assembled_trainer

    pairs = [{"prompt": f"def f{i}(x):\n    'Add {i}.'", "response": f"    return x + {i}"} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "corpus.txt").write_text("\n".join(p["prompt"] + "\n" + p["response"] for p in pairs))
    tok = train_tokenizer([str(tmp_path / "corpus.txt")], tmp_path / "tok", kind="bpe", vocab_size=300)
    gpt = dict(family="gpt", vocab_size=300, max_seq_len=128, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    save_pretrained(build_model(gpt, "causal_lm"), tmp_path / "gpt", tok)
    sets = [f"init_from={tmp_path / 'gpt'}", f"data.train={tmp_path / 'pairs.jsonl'}", "data.val=null"]
    sets += [f"run_dir={tmp_path / 'run'}", "train.max_steps=3", "checkpoint.save_final=false"]
    recipe = load_finetune_recipe(ROOT / "configs" / "finetune" / "instruct.yaml", sets)
    trainer = assembled_trainer(recipe)
    assert trainer.task.name == "instruction" and recipe.data.tokenizer == str(tmp_path / "gpt" / "tokenizer.json")
    assert trainer.fit()["steps"] == 3
