"""An instruction LoRA run on a LLaMA-style base: RUN_DIR/export is a Hugging Face directory whose
tokenizer's chat_template reproduces llm's training prompt token for token, and transformers' greedy
generation equals `llm generate`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.conftest import rel_err

transformers = pytest.importorskip("transformers")

CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
LLAMA = dict(family="llama", max_seq_len=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
LLAMA.update(norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, tie_embeddings=False)
PAIRS = [{"prompt": f"add {i} and {i + 1}", "response": f"{i} plus {i + 1} is {2 * i + 1}"} for i in range(24)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`llm finetune` of an instruction LoRA (ChatML template, markers as special tokens), 6 steps."""
    from llm.data.tokenizer import train_tokenizer
    from llm.run.loader import save_pretrained
    from llm.run.train import finetune
    from llm.tasks import build_model

    root = tmp_path_factory.mktemp("instruct")
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    (root / "corpus.txt").write_text("\n".join(p["prompt"] + "\n" + p["response"] for p in PAIRS))
    markers = ["<|im_start|>", "<|im_end|>"]
    tok = train_tokenizer([str(root / "corpus.txt")], root / "tok", vocab_size=320, special_tokens=markers)
    torch.manual_seed(0)
    save_pretrained(build_model({**LLAMA, "vocab_size": 320}, "causal_lm"), root / "base", tok)
    recipe = {
        "init_from": str(root / "base"),
        "task": {"name": "instruction", "template": CHATML},
        "data": {"train": str(root / "pairs.jsonl"), "val": None, "seq_len": 48},
        "adapt": {"method": "lora", "rank": 4, "targets": ["q", "v", "gate"]},
        "run_dir": str(root / "run"),
        "train": {"micro_batch_size": 4, "max_steps": 6, "log_every": 3},
        "optim": {"lr": 1e-2},
        "deepspeed": {"preset": "zero0"},
        "logging": {"tensorboard": False, "progress": False},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    finetune(str(root / "recipe.yaml"))  # what `llm finetune recipe.yaml` runs
    return root / "run"


def test_transformers_loads_the_export_and_its_chat_template_gives_the_training_prompt(run):
    from llm.data import Tokenizer
    from llm.run.loader import load_checkpoint_model, load_model

    export = run / "export"
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert isinstance(hf_model, transformers.LlamaForCausalLM)
    trained = load_checkpoint_model(run / "checkpoints").eval()
    reloaded = load_model(export).eval()  # the chat template reads back as the instruction task
    assert reloaded.task == "instruction" and reloaded.options.template == CHATML

    tok = Tokenizer(export / "tokenizer.json")
    eos = tok.eos_id  # the run took EOS from the tokenizer (the base config names none)
    for pair in PAIRS[:4]:
        user = [{"role": "user", "content": pair["prompt"]}]
        prompt = hf_tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert prompt == trained.options.encode(tok, pair["prompt"])  # the prompt llm trained on
        answer = {"role": "assistant", "content": pair["response"]}
        whole = hf_tok.apply_chat_template([*user, answer], return_dict=False)
        assert whole == prompt + tok.encode(pair["response"]) + [eos]  # response and EOS
        ids = torch.tensor([whole])
        with torch.no_grad():
            want = trained(ids).logits  # the unmerged LoRA of the final checkpoint
            assert rel_err(hf_model(ids).logits, want) < 1e-5
            assert rel_err(reloaded(ids).logits, want) < 1e-5


def test_greedy_generation_in_transformers_equals_llm_generate(run):
    from llm.run.generate import generate_text

    export = run / "export"
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    prompts = [PAIRS[1]["prompt"], "add 7 and 3"]
    ours = generate_text(model=str(export), prompt=prompts, max_new_tokens=12, temperature=0.0)
    for prompt, text in zip(prompts, ours):
        ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)  # fmt: skip
        out = hf_model.generate(**ids, max_new_tokens=12, do_sample=False)
        assert text == hf_tok.decode(out[0], skip_special_tokens=True)
