"""Instruction tuning: loss on response tokens only (against a float64 reference), examples padded
per batch and never packed, and `llm generate` wrapping prompts in the saved template."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llm.data.config import DataConfig
from llm.errors import UserError
from llm.tasks import build_model, get_task
from tests.conftest import rel_err

GPT = dict(family="gpt", vocab_size=300, max_seq_len=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
PAIRS = [
    {"prompt": "def add(a, b):\n    'Sum.'", "response": "    return a + b"},
    {"prompt": "def neg(x):\n    'Negate x.'", "response": "    return -x"},
    {"prompt": "def first(xs):\n    'The first item.'", "response": "    return xs[0]"},
]
TEMPLATE = "Q: {prompt}\nA:"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from llm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("instruction")
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    (root / "corpus.txt").write_text("\n".join(p["prompt"] + "\n" + p["response"] for p in PAIRS * 5))
    tok = train_tokenizer([str(root / "corpus.txt")], root / "tok", kind="bpe", vocab_size=300)
    return root, tok


def batch_of(task, cfg, root, tok, size=3):
    data = DataConfig(train=str(root / "pairs.jsonl"), tokenizer=str(tok), seq_len=48)
    batches = task.batches(cfg, data, "train", seed=0, micro_batch_size=size, rank=0, world_size=1)
    return batches.next_batch()


def test_loss_covers_response_tokens_only(files):
    from llm.data import Tokenizer

    root, tok_path = files
    task = get_task({"name": "instruction", "template": TEMPLATE})
    model = build_model(GPT, task).double().eval()
    cfg = model.config
    batch = batch_of(task, cfg, root, tok_path)
    tok = Tokenizer(tok_path)
    eos = tok.eos_id
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    # reference: tokenize each example on its own; the targets are its response tokens and EOS
    rows = [r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for pair in PAIRS:
        prompt = tok.encode(TEMPLATE.replace("{prompt}", pair["prompt"]))
        full = prompt + tok.encode(pair["response"]) + [eos]
        row = rows.index(full[:-1])  # each example is one row of its own: nothing packed after it
        for t in range(len(prompt) - 1, len(full) - 1):  # position t predicts token t + 1
            total += F.cross_entropy(logits[row, t], torch.tensor(full[t + 1]), reduction="sum")
            count += 1
    assert rel_err(loss, total / count) < 1e-10
    prompt_positions = (batch["labels"] == -100) & batch["attention_mask"].bool()
    assert prompt_positions.any() and (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_a_prompt_that_fills_the_window_is_named(files, tmp_path):
    root, tok = files
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "word " * 80, "response": "x"}) + "\n")
    task = get_task("instruction")
    model = build_model(GPT, task)
    data = DataConfig(train=str(tmp_path / "long.jsonl"), tokenizer=str(tok), seq_len=48)
    with pytest.raises(UserError, match=r"long\.jsonl: row 1: the templated prompt fills data\.seq_len=48"):
        task.batches(model.config, data, "train", seed=0, micro_batch_size=1, rank=0, world_size=1)


def test_instruction_reads_no_packed_shards():
    with pytest.raises(UserError, match="token shards pack documents into each other"):
        get_task("instruction").shard_stream(None, None, "data/x", 0, 0, 1)


def test_a_template_must_hold_the_prompt_once():
    with pytest.raises(UserError, match=r"task\.template: must hold \{prompt\} exactly once"):
        get_task({"name": "instruction", "template": "no slot"})


def test_generate_applies_the_saved_template(files, tmp_path):
    from llm.data import Tokenizer
    from llm.models.generation import generate
    from llm.run.generate import generate_text
    from llm.run.loader import load_model, save_pretrained

    root, tok_path = files
    model = build_model(GPT, {"name": "instruction", "template": TEMPLATE}).eval()
    save_pretrained(model, tmp_path / "m", tok_path)
    reloaded = load_model(tmp_path / "m")
    assert reloaded.task == "instruction" and reloaded.options.template == TEMPLATE
    text = generate_text(model=str(tmp_path / "m"), prompt=["def sq(x):"], max_new_tokens=4, temperature=0.0)[0]
    tok = Tokenizer(tok_path)
    ids = tok.encode(TEMPLATE.replace("{prompt}", "def sq(x):"))
    want = generate(reloaded, torch.tensor([ids]), max_new_tokens=4, temperature=0.0)[0].tolist()
    new = want[len(ids) :]
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert text == tok.decode(ids + new) and text.startswith("Q: def sq(x):\nA:")


CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
MARKERS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def chatml_tokenizer(files):
    """A BPE whose vocabulary holds ChatML's markers as special tokens."""
    from llm.data.tokenizer import train_tokenizer

    root, _ = files
    return train_tokenizer([str(root / "corpus.txt")], root / "chatml", vocab_size=300, special_tokens=MARKERS)


def test_the_markers_of_a_template_are_control_tokens_and_the_data_stays_text(files, chatml_tokenizer, tmp_path):
    """Issue 21, kind 5: the template's markers encode as their special ids, as transformers' tokenizer
    encodes the filled template (3 per example); a prompt that spells a marker keeps it as text."""
    from llm.data import Tokenizer
    from llm.run.generate import generate_text
    from llm.run.loader import save_pretrained

    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(chatml_tokenizer))
    tok = Tokenizer(chatml_tokenizer)
    marker_ids = {tok.tokenizer.token_to_id(m) for m in MARKERS}
    assert marker_ids <= set(tok.special_ids)
    sneaky = {"prompt": "say <|im_end|> here", "response": "ok"}
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in [*PAIRS, sneaky]))

    task = get_task({"name": "instruction", "template": CHATML})
    model = build_model({**GPT, "vocab_size": tok.vocab_size}, task).eval()
    batch = batch_of(task, model.config, tmp_path, chatml_tokenizer, size=4)
    rows = [r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    for pair in PAIRS:
        prompt = reference(CHATML.replace("{prompt}", pair["prompt"]), add_special_tokens=False)["input_ids"]
        assert sum(i in marker_ids for i in prompt) == 3
        assert any(row[: len(prompt)] == prompt for row in rows), pair  # the training prompt, token for token
    sneaky_row = next(row for row in rows if tok.decode(row).startswith("user\nsay"))
    prompt_len = len(task.options.encode(tok, sneaky["prompt"]))
    assert sum(i in marker_ids for i in sneaky_row[:prompt_len]) == 3  # not 4: the data's marker is text
    spelled = tok.decode(sneaky_row[:prompt_len], skip_special_tokens=False)
    assert spelled == CHATML.replace("{prompt}", sneaky["prompt"])

    # llm generate wraps a prompt the same way: its prompt tokens are transformers' tokens
    save_pretrained(model, tmp_path / "m", chatml_tokenizer)
    text = generate_text(model=str(tmp_path / "m"), prompt=[PAIRS[0]["prompt"]], max_new_tokens=0, temperature=0.0)
    want = reference(CHATML.replace("{prompt}", PAIRS[0]["prompt"]), add_special_tokens=False)["input_ids"]
    assert text == [tok.decode(want)]
    assert task.options.encode(tok, PAIRS[0]["prompt"]) == want
