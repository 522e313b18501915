"""Exports of adapted models, checked with the tools that load them: the merged Hugging Face
directory with `transformers`, the LoRA adapter with `peft` on the untouched base (PEFT 0.21),
and llm's prefix/prompt adapter layout with its own loader."""

import json

import pytest
import torch

from llm.adapt import apply_transforms, lora
from llm.adapt.export import load_virtual_adapter
from llm.run.export import export_artifacts
from llm.run.loader import load_model
from llm.tasks.hf import from_hf
from tests.conftest import rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TEXT = dict(vocab_size=101, attn_implementation="eager")
GPT2 = dict(TEXT, n_embd=48, n_layer=2, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0)
GPT2.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
LLAMA = dict(TEXT, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
LLAMA.update(max_position_embeddings=64, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
BERT = dict(TEXT, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
BERT.update(max_position_embeddings=40, pad_token_id=0, num_labels=3)
BERT.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# name: (architecture, config class, config, LoRA settings)
CASES = {
    "gpt2-q-v-slices": ("GPT2LMHeadModel", "GPT2Config", GPT2, {"targets": ["q", "v", "fc_in", "proj"]}),
    "gpt2-whole-qkv": ("GPT2LMHeadModel", "GPT2Config", GPT2, {"targets": ["qkv", "fc_out"], "rank": 3}),
    "llama-gqa-slices": (
        "LlamaForCausalLM",
        "LlamaConfig",
        LLAMA,
        {"targets": ["q", "k", "v", "proj", "gate", "up", "lm_head"], "alpha": 5},
    ),
    "llama-whole-fused": ("LlamaForCausalLM", "LlamaConfig", LLAMA, {"targets": ["qkv", "fc_in", "fc_out"]}),
    "bert-classifier": (
        "BertForSequenceClassification",
        "BertConfig",
        BERT,
        {"targets": ["q", "v", "fc_out", "dense"], "trainable": ["classifier"]},
    ),
    # an embedding trained beside the adapters, tied to the output (unsloth#9331, peft#2399)
    "gpt2-tied-embedding": ("GPT2LMHeadModel", "GPT2Config", GPT2, {"targets": ["q"], "trainable": ["tok_embed"]}),
    "llama-tied-embedding": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(LLAMA, tie_word_embeddings=True),
        {"targets": ["q", "v"], "trainable": ["tok_embed"]},
    ),
    "bert-mlm-tied-embedding": (
        "BertForMaskedLM",
        "BertConfig",
        BERT,
        {"targets": ["q", "v"], "trainable": ["tok_embed", "mlm.decoder.bias"]},
    ),
}


def hf_base(arch, config_class, config, path):
    torch.manual_seed(0)
    model = getattr(transformers, arch)(getattr(transformers, config_class)(**config))
    model.save_pretrained(path)
    return path


def trained_like(model):
    """Adapters and trainable modules moved away from their start, as training would."""
    with torch.no_grad():
        for _, layer in lora.adapted_layers(model):
            for _, _, a, b in layer.lora_pairs():
                b.normal_(std=0.1)
                a.add_(torch.randn_like(a) * 0.01)
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_on_the_untouched_base_gives_the_merged_logits(case, tmp_path):
    arch, config_class, config, settings = CASES[case]
    base = hf_base(arch, config_class, config, tmp_path / "base")
    ours = apply_transforms(from_hf(base), [{"name": "lora", "rank": 4, **settings}])
    trained_like(ours)
    ours.eval()
    export_artifacts(ours, tmp_path / "export", base_model=str(base))

    cls = getattr(transformers, arch)
    merged = cls.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    untouched = cls.from_pretrained(base, attn_implementation="eager")
    adapted = peft.PeftModel.from_pretrained(untouched, tmp_path / "export" / "adapter").eval()
    x = torch.randint(1, 101, (2, 11))
    with torch.no_grad():
        want = merged(input_ids=x).logits
        assert rel_err(adapted(input_ids=x).logits, want) < 1e-5
        assert rel_err(ours(x).logits, want) < 1e-5
        assert rel_err(cls.from_pretrained(base, attn_implementation="eager").eval()(input_ids=x).logits, want) > 1e-3
    config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base)


def test_what_peft_cannot_hold_leaves_the_adapter_out_and_the_merged_export_holds_it(tmp_path, caplog):
    """A layer both adapted and trained in full, a classifier whose rows the base names otherwise: one
    warning naming it, no adapter/, and transformers reads the trained model from the merged export."""
    base = hf_base("GPT2LMHeadModel", "GPT2Config", GPT2, tmp_path / "base")
    ours = apply_transforms(from_hf(base), [{"name": "lora", "targets": ["q"], "trainable": ["blocks.0.attn.qkv"]}])
    trained_like(ours)
    with caplog.at_level("WARNING", logger="llm"):
        out = export_artifacts(ours.eval(), tmp_path / "export", base_model=str(base))
    assert out["format"] == "hf" and out["adapter"] is None and not (tmp_path / "export" / "adapter").exists()
    assert (
        "adapter: not written: transformer.h.0.attn.c_attn is both adapted by LoRA and trained in full" in caplog.text
    )
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    x = torch.randint(1, 101, (2, 11))
    with torch.no_grad():
        assert rel_err(merged(input_ids=x).logits, ours(x).logits) < 1e-5

    labels = {0: "contradiction", 1: "neutral", 2: "entailment"}
    base = hf_base("BertForSequenceClassification", "BertConfig", dict(BERT, id2label=labels), tmp_path / "cls")
    ours = apply_transforms(from_hf(base), [{"name": "lora", "targets": ["q"], "trainable": ["classifier"]}])
    ours.options.labels = ["neutral", "contradiction", "entailment"]  # as a run that moved the rows by name
    caplog.clear()
    with caplog.at_level("WARNING", logger="llm"):
        out = export_artifacts(ours.eval(), tmp_path / "export-cls", base_model=str(base))
    assert out["adapter"] is None and "names the classifier's rows contradiction, neutral, entailment" in caplog.text


def test_a_prefix_beside_lora_is_the_adapter_and_the_lora_is_merged(tmp_path):
    base = hf_base("LlamaForCausalLM", "LlamaConfig", LLAMA, tmp_path / "base")
    specs = [{"name": "prefix", "num_virtual_tokens": 2}, {"name": "lora", "targets": ["q", "v"]}]
    ours = apply_transforms(from_hf(base), specs)
    trained_like(ours)
    out = export_artifacts(ours.eval(), tmp_path / "export", base_model=str(base))
    config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert out["format"] == "hf" and config["format"] == "llm-adapter"
    x = torch.randint(1, 101, (2, 9))
    with torch.no_grad():
        assert rel_err(load_model(tmp_path / "export").eval()(x).logits, ours(x).logits) < 1e-5


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_adapters_rebuild_on_the_exported_base(method, tmp_path):
    base = hf_base("LlamaForCausalLM", "LlamaConfig", LLAMA, tmp_path / "base")
    spec = {"name": method, "num_virtual_tokens": 3}
    if method == "prefix":
        spec.update(reparameterize=True, hidden_size=8)
    ours = apply_transforms(from_hf(base), [spec]).eval()
    out = export_artifacts(ours, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["format"] == "llm-adapter" and config["transforms"][0]["name"] == method
    plain = from_hf(tmp_path / "export")  # the frozen base, untouched
    x = torch.randint(1, 101, (2, 9))
    assert torch.equal(plain.eval()(x).logits, from_hf(base).eval()(x).logits)
    rebuilt = load_virtual_adapter(plain, out["adapter"]).eval()
    assert rel_err(rebuilt(x).logits, ours(x).logits) < 1e-6
    assert rel_err(load_model(tmp_path / "export").eval()(x).logits, ours(x).logits) < 1e-6  # the one loader


@pytest.mark.parametrize(
    "task, transforms",
    [
        ({"task": "text_classification", "pooling": "mean"}, [{"name": "prefix", "num_virtual_tokens": 2}]),
        ({"task": "contrastive"}, [{"name": "lora", "targets": ["q", "v"]}]),
    ],
)
def test_a_model_hugging_face_cannot_hold_exports_as_an_llm_directory(task, transforms, tmp_path):
    """Mean pooling and a contrastive objective have no transformers architecture: the export is
    llm's model directory, replacing an earlier export of the other format, and loads the same."""
    from llm.run.export import export_artifacts
    from llm.run.formats.hf import check
    from tests.conftest import build

    gpt = dict(family="gpt", vocab_size=97, max_seq_len=40, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    gpt.update(mlp="gelu_tanh", dropout=0.0, attention_dropout=0.0)
    plain = build(gpt, **task)
    assert check(plain) is not None
    export_artifacts(build(gpt), tmp_path / "export")  # an earlier export, in Hugging Face's format
    assert (tmp_path / "export" / "config.json").is_file()
    ours = apply_transforms(plain, transforms).eval()
    trained_like(ours)
    out = export_artifacts(ours, tmp_path / "export")
    assert out == {"export": str(tmp_path / "export"), "format": "llm", "adapter": None}
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = load_model(tmp_path / "export").eval()
    assert loaded.transforms == ours.transforms and loaded.options == ours.options
    x = torch.randint(1, 97, (2, 9))
    assert torch.equal(loaded(x).logits, ours(x).logits)


def test_hf_holds_a_model_only_where_transformers_computes_the_same():
    """Pooling decides: [CLS] for BERT and the last token for causal bodies, given or by default."""
    from llm.run.formats.hf import check
    from tests.conftest import build

    gpt = dict(family="gpt", vocab_size=97, max_seq_len=40, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    bert = dict(gpt, family="bert", causal=False, norm_position="post", type_vocab_size=2, pooler=True)
    bert.update(mlp="gelu")
    assert check(build(gpt, task="text_classification")) is None
    assert check(build(gpt, task="text_classification", pooling="last")) is None
    assert check(build(gpt, task="text_classification", pooling="first")) is not None
    assert check(build(bert, task="text_classification", pooling="first")) is None
    assert check(build(bert, task="text_classification", pooling="mean")) is not None
    assert check(build(gpt, task="instruction")) is None  # its template goes to the tokenizer's chat_template
    assert check(build(gpt)) is None
