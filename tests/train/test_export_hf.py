"""`llm pretrain`'s export is a Hugging Face directory: transformers' Auto classes and pipeline read it
as it is, generation stops at the tokenizer's EOS, and llm's own commands still read it."""

import json

import pytest

from llm.run.recipe import load_recipe
from tests.train.helpers import ROOT, assembled_trainer

transformers = pytest.importorskip("transformers")

# Short documents, so the model meets EOS every few tokens and learns to end a function there.
DOCS = [f"def f{i}(x):\n    return x + {i % 7}\n" for i in range(300)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quickstart run, shrunk: its own tokenizer and shards of short documents, 60 steps."""
    from llm import data as D
    from llm.run.train import export

    root = tmp_path_factory.mktemp("export")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"doc{i:03d}.py").write_text(doc)
    tok = D.train_tokenizer([str(corpus)], root / "data", kind="bpe", vocab_size=300)
    D.prepare([str(corpus)], tok, root / "data", shard_tokens=50_000, val_fraction=0.1, workers=1)
    sets = [
        "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.d_ff=128", "model.vocab_size=300",
        "model.max_seq_len=64", "data.seq_len=32", f"data.train={root / 'data' / 'train'}",
        f"data.val={root / 'data' / 'val'}", f"data.tokenizer={tok}", "data.prepare=null", "train.max_steps=60",
        "train.micro_batch_size=16", "train.eval_every=0", "train.eval_batches=1", "logging.tensorboard=false",
        "logging.sample_prompt=null", "checkpoint.every_steps=0", f"run_dir={root / 'run'}",
    ]  # fmt: skip
    recipe = load_recipe(ROOT / "configs" / "recipes" / "quickstart.yaml", sets)
    trainer = assembled_trainer(recipe)
    trainer.fit()
    return export(trainer.model.float().eval(), recipe), recipe


def test_export_is_a_hugging_face_directory_with_tokenizer_and_generation_config(trained):
    path, recipe = trained
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):  # fmt: skip
        assert (path / name).is_file(), name
    assert not (path / "config.yaml").exists()  # one format per directory
    tok = transformers.AutoTokenizer.from_pretrained(path)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == eos
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == eos
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.eos_token_id == eos and model.generation_config.eos_token_id == eos
    assert (path.parent / "tokenizer.json").is_file()  # the run keeps its tokenizer


def test_pipeline_stops_at_eos_and_agrees_with_llm_generate(trained):
    from llm.run.generate import generate_text
    from llm.run.loader import load_model

    path, _ = trained
    pipe = transformers.pipeline("text-generation", model=str(path), device="cpu")
    eos = pipe.tokenizer.eos_token_id
    prompt = "def f12(x):\n"
    out = pipe(prompt, max_new_tokens=40, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    new = out[len(pipe.tokenizer(prompt)["input_ids"]) :]
    assert eos in new and new[-1] == eos and len(new) < 40, new  # stopped at its first EOS
    text = pipe(prompt, max_new_tokens=40, do_sample=False)[0]["generated_text"]
    ours = generate_text(model=str(path), prompt=[prompt], max_new_tokens=40, temperature=0.0)[0]
    assert ours == text
    assert load_model(path).config.eos_token_id == eos


def test_run_checkpoints_generate_with_the_runs_own_tokenizer(trained):
    from llm.run.generate import generate_text

    path, recipe = trained
    checkpoints = str(path.parent / "checkpoints")
    ours = generate_text(model=checkpoints, prompt=["def f1(x):\n"], max_new_tokens=8, temperature=0.0)
    assert ours[0].startswith("def f1(x):\n")


def test_a_model_without_hugging_face_equivalent_exports_as_an_llm_directory(tmp_path):
    from llm.run.loader import load_model, model_kind
    from llm.run.recipe import resolve_recipe
    from llm.run.train import export
    from llm.tasks import build_model
    from tests.train.helpers import TINY

    recipe = resolve_recipe({**TINY, "run_dir": str(tmp_path)})
    plain = build_model(recipe.model, "causal_lm")
    mean_pooled = build_model(recipe.model, {"name": "text_classification", "num_labels": 3, "pooling": "mean"})
    out = export(mean_pooled, recipe)  # transformers' GPT-2 classifier pools the last token
    assert model_kind(out) == "llm" and not (out / "config.json").exists()
    assert load_model(out).options == mean_pooled.options
    out = export(plain, recipe)  # the same directory, now a Hugging Face one: one format at a time
    assert model_kind(out) == "hf" and not (out / "config.yaml").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt2"
