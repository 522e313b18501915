"""Hugging Face interop: small random `transformers` models, converted both ways.

The reference is `transformers` itself (eager attention): our model built from its
directory must give the same logits, hidden states and pooled outputs (fp32
relative error < 1e-5), and exporting ours back must reproduce every tensor exactly.
"""

import json

import pytest
import torch

from llm.errors import UserError
from llm.tasks.hf import from_hf, to_hf
from tests.conftest import rel_err

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=101, attn_implementation="eager")
GPT2 = dict(TEXT, n_embd=48, n_layer=2, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0)
LLAMA = dict(TEXT, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
LLAMA.update(max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0, bos_token_id=1, eos_token_id=2)
BERT = dict(TEXT, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
BERT.update(max_position_embeddings=40, type_vocab_size=3, pad_token_id=0)
VIT = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=12)
VIT.update(patch_size=4, encoder_stride=4, num_channels=3, attn_implementation="eager")

CASES = {
    "gpt2-lm": ("GPT2LMHeadModel", "GPT2Config", GPT2),
    "gpt2-base": ("GPT2Model", "GPT2Config", {**GPT2, "activation_function": "gelu", "n_inner": 72}),
    "llama-gqa-untied": ("LlamaForCausalLM", "LlamaConfig", {**LLAMA, "num_key_value_heads": 2}),
    "llama-mha-tied": ("LlamaForCausalLM", "LlamaConfig", {**LLAMA, "tie_word_embeddings": True}),
    "llama-mqa-bias-base": (
        "LlamaModel",
        "LlamaConfig",
        {**LLAMA, "num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},
    ),
    "gpt2-cls": ("GPT2ForSequenceClassification", "GPT2Config", {**GPT2, "num_labels": 3, "pad_token_id": 100}),
    "llama-gqa-cls": (
        "LlamaForSequenceClassification",
        "LlamaConfig",
        {**LLAMA, "num_key_value_heads": 2, "num_labels": 3, "pad_token_id": 0},
    ),
    "bert-cls": ("BertForSequenceClassification", "BertConfig", {**BERT, "num_labels": 3}),
    "bert-pretraining": ("BertForPreTraining", "BertConfig", BERT),
    "bert-mlm": ("BertForMaskedLM", "BertConfig", BERT),
    "bert-base": ("BertModel", "BertConfig", BERT),
    "vit-base": ("ViTModel", "ViTConfig", VIT),
    "vit-cls": ("ViTForImageClassification", "ViTConfig", {**VIT, "num_labels": 5}),
    "vit-mim": ("ViTForMaskedImageModeling", "ViTConfig", VIT),
}


def hf_model(arch: str, config_class: str, kwargs: dict):
    """A random transformers model whose every tensor (norms and biases too) is perturbed."""
    model = getattr(transformers, arch)(getattr(transformers, config_class)(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(arch: str, pad_token_id: int | None = None):
    if arch.startswith("ViT"):
        return dict(pixel_values=torch.randn(2, 3, 12, 12))
    ids = torch.randint(1, 100, (2, 13))
    mask = torch.ones_like(ids)
    if arch.endswith("ForSequenceClassification") and not arch.startswith("Bert"):
        ids[1, 9:] = pad_token_id  # right padding: transformers pools the last non-pad token
        mask[1, 9:] = 0
        return dict(input_ids=ids, attention_mask=mask)
    if arch.startswith("Bert"):
        mask[1, 9:] = 0  # right padding
        types = torch.zeros_like(ids)
        types[:, 6:] = 1
        types[0, 10:] = 2
        return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return dict(input_ids=ids)


def compare(arch: str, ref, ours, x) -> None:
    """Every output the HF model gives against ours; padded positions are not compared for BERT."""
    with torch.no_grad():
        out = ref(**x)
        base = ref.base_model(**x)
        mine = ours(**x)
    keep = x.get("attention_mask", torch.ones(1, 1)).bool()
    real = (lambda t: t[keep]) if keep.shape[-1] > 1 else (lambda t: t)
    assert rel_err(real(mine.hidden_states), real(base.last_hidden_state)) < 1e-5
    if getattr(base, "pooler_output", None) is not None and mine.pooled is not None:
        assert rel_err(mine.pooled, base.pooler_output) < 1e-5
    if arch.endswith(("LMHeadModel", "ForCausalLM", "ForMaskedLM")):
        assert rel_err(real(mine.logits), real(out.logits)) < 1e-5
    if arch == "BertForPreTraining":
        assert rel_err(real(mine.logits), real(out.prediction_logits)) < 1e-5
        assert rel_err(mine.nsp_logits, out.seq_relationship_logits) < 1e-5
    if arch in ("ViTForImageClassification",) or arch.endswith("ForSequenceClassification"):
        assert rel_err(mine.logits, out.logits) < 1e-5
    if arch == "ViTModel":
        assert mine.pooled is not None


@pytest.mark.parametrize("case", list(CASES))
def test_hf_parity_and_exact_round_trip(case, tmp_path):
    arch, config_class, kwargs = CASES[case]
    ref = hf_model(arch, config_class, kwargs)
    ref.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()
    compare(arch, ref, ours, inputs(arch, kwargs.get("pad_token_id")))

    to_hf(ours, tmp_path / "back")
    back, info = getattr(transformers, arch).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original, restored = ref.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name


# config.json fields transformers accepts that change nothing llm computes (issue 21, kind 7): unused by
# the architecture (encoder_stride without a decoder, a pooler's fields without a pooler, the MLM tie
# without an MLM head, cross-attention without an encoder), another spelling (activations), a rope key
# the scaling does not read, another model type's name for the same classifier
LENIENT = {
    "vit-cls-encoder-stride": (
        "ViTForImageClassification",
        "ViTConfig",
        {**VIT, "num_labels": 5, "encoder_stride": 16},
    ),
    "vit-base-encoder-stride": ("ViTModel", "ViTConfig", {**VIT, "encoder_stride": 16}),
    "vit-cls-pooler-fields": (
        "ViTForImageClassification",
        "ViTConfig",
        {**VIT, "num_labels": 5, "pooler_act": "relu", "pooler_output_size": 7},
    ),
    "bert-cls-untied": (
        "BertForSequenceClassification",
        "BertConfig",
        {**BERT, "num_labels": 3, "tie_word_embeddings": False},
    ),
    "bert-gelu-python": ("BertModel", "BertConfig", {**BERT, "hidden_act": "gelu_python"}),
    "gpt2-gelu-accurate": ("GPT2LMHeadModel", "GPT2Config", {**GPT2, "activation_function": "gelu_accurate"}),
    "gpt2-cross-attention": ("GPT2LMHeadModel", "GPT2Config", {**GPT2, "add_cross_attention": True}),
    "llama-swish": ("LlamaForCausalLM", "LlamaConfig", {**LLAMA, "hidden_act": "swish"}),
    "llama-rope-unread-key": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "unread": 1}},
    ),
    "qwen2-cls": (
        "Qwen2ForSequenceClassification",
        "Qwen2Config",
        {**LLAMA, "num_key_value_heads": 2, "num_labels": 3, "pad_token_id": 0},
    ),
}


@pytest.mark.parametrize("case", list(LENIENT))
def test_fields_transformers_accepts_and_nothing_computes_load_with_its_outputs(case, tmp_path):
    arch, config_class, kwargs = LENIENT[case]
    ref = hf_model(arch, config_class, kwargs)
    ref.save_pretrained(tmp_path / "hf")
    compare(arch, ref, from_hf(tmp_path / "hf").eval(), inputs(arch, kwargs.get("pad_token_id")))


def test_vit_masked_image_modeling_reconstruction_and_loss(tmp_path):
    ref = hf_model("ViTForMaskedImageModeling", "ViTConfig", VIT)
    ref.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    pixels = torch.randn(2, 3, 12, 12)
    masked = torch.rand(2, 9) < 0.5
    masked[:, 0] = True
    with torch.no_grad():
        out = ref(pixel_values=pixels, bool_masked_pos=masked)
        mine = ours(pixel_values=pixels, bool_masked_pos=masked)
    assert rel_err(mine.logits, out.reconstruction) < 1e-5
    assert rel_err(mine.loss, out.loss) < 1e-5


def test_llama_loss_and_config_fields(tmp_path):
    ref = hf_model("LlamaForCausalLM", "LlamaConfig", {**LLAMA, "num_key_value_heads": 2})
    ref.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    cfg = ours.config
    assert (cfg.n_kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (2, 500.0, 1e-5, False)
    assert cfg.eos_token_id == 2
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        ref_loss = ref(input_ids=ids, labels=ids).loss  # HF shifts inside
        labels = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), dim=1)
        assert rel_err(ours(ids, labels=labels).loss, ref_loss) < 1e-5


def test_task_override_keeps_the_trunk(tmp_path):
    ref = hf_model("BertForPreTraining", "BertConfig", BERT)
    ref.save_pretrained(tmp_path)
    ours = from_hf(tmp_path, task="text_classification").eval()
    x = inputs("BertModel")
    with torch.no_grad():
        keep = x["attention_mask"].bool()
        want = ref.bert(**x)
        got = ours.transformer(x["input_ids"], attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"])
    assert rel_err(got[keep], want.last_hidden_state[keep]) < 1e-5
    assert ours(**x).logits.shape == (2, 2)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(UserError, match=r"config\.json.*'T5ForConditionalGeneration' is not supported"):
        from_hf(tmp_path)


def test_missing_and_mismatched_weights_name_the_directory(tmp_path):
    with pytest.raises(UserError, match="config.json: not found"):
        from_hf(tmp_path)
    ref = hf_model("GPT2LMHeadModel", "GPT2Config", GPT2)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_inner"] = 64  # the weights say 4 * 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="mlp.fc_in.weight has shape"):
        from_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="model.safetensors: not a readable safetensors file"):
        from_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights found"):
        from_hf(tmp_path)


def test_export_rejects_a_model_without_hf_equivalent(tmp_path):
    from llm.tasks import build_model

    model = build_model(dict(family="gpt", vocab_size=50, max_seq_len=8, d_model=16, n_layers=1, n_heads=2,
                             d_ff=32, norm="rmsnorm"))  # fmt: skip
    with pytest.raises(UserError, match="model.norm: GPT2LMHeadModel needs 'layernorm'"):
        to_hf(model, tmp_path)


def test_pytorch_bin_and_sharded_safetensors_load_the_same(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = hf_model("LlamaForCausalLM", "LlamaConfig", {**LLAMA, "tie_word_embeddings": True})
    ref.save_pretrained(tmp_path / "single")
    expected = from_hf(tmp_path / "single").state_dict()
    tensors = load_file(str(tmp_path / "single" / "model.safetensors"))
    config = (tmp_path / "single" / "config.json").read_text()

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(config)
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # carries the tied lm_head too

    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "config.json").write_text(config)
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / "sharded" / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    for kind in ("bin", "sharded"):
        got = from_hf(tmp_path / kind).state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), kind


def test_unused_tensors_are_ignored_with_one_warning_and_missing_trunk_tensors_refused(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    ref = hf_model("BertModel", "BertConfig", BERT)
    ref.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("layer.1.output.dense.weight"))
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with caplog.at_level("WARNING", logger="llm"):
        from_hf(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(warnings) == 1 and "1 tensors that BertModel does not use, ignored: extra.weight" in warnings[0]
    save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="lack encoder.layer.1.output.dense.weight"):
        from_hf(tmp_path)
