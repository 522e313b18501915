"""What conversion carries besides weights, and how tolerant loading is, against `transformers`:
special-token ids and their lists (config.json and generation_config.json), unused and missing
tensors, and rotary tables that stay float32 under any cast."""

import json

import pytest
import torch

from llm.errors import UserError
from llm.models.generation import generate
from llm.tasks.hf import from_hf, to_hf
from tests.conftest import rel_err
from tests.models.test_hf import BERT, LLAMA, VIT, hf_model, inputs

transformers = pytest.importorskip("transformers")


# -- special tokens ------------------------------------------------------------------------------


def test_eos_list_is_kept_both_ways_and_transformers_reads_it_back(tmp_path):
    ref = hf_model("LlamaForCausalLM", "LlamaConfig", {**LLAMA, "eos_token_id": [7, 0], "pad_token_id": 3})
    ref.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    assert (ours.config.eos_token_id, ours.config.bos_token_id, ours.config.pad_token_id) == ([7, 0], 1, 3)
    to_hf(ours, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert back.config.eos_token_id == [7, 0] and back.generation_config.eos_token_id == [7, 0]
    assert (back.config.bos_token_id, back.config.pad_token_id) == (1, 3)


def test_generation_config_overrides_config_json(tmp_path):
    ref = hf_model("GPT2LMHeadModel", "GPT2Config", {**LLAMA_LIKE_GPT2})
    ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9], "bos_token_id": 4}))
    cfg = from_hf(tmp_path).config
    assert (cfg.eos_token_id, cfg.bos_token_id) == ([5, 9], 4)


LLAMA_LIKE_GPT2 = dict(vocab_size=101, n_embd=48, n_layer=2, n_head=4, n_positions=40, eos_token_id=0)


def test_generation_stops_at_any_eos_of_the_list(tmp_path):
    ref = hf_model("LlamaForCausalLM", "LlamaConfig", LLAMA)
    ref.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    prompt = torch.randint(3, 101, (1, 5))
    free = generate(ours, prompt, max_new_tokens=12, temperature=0.0)[0, 5:].tolist()
    stop_at = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)  # a token first seen at step i
    ours.config.eos_token_id = [100 if free[stop_at] != 100 else 99, free[stop_at]]  # the second id ends it
    stopped = generate(ours, prompt, max_new_tokens=12, temperature=0.0)[0, 5:].tolist()
    assert stopped == free[: stop_at + 1]
    # transformers agrees on where the same list stops greedy generation
    want = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=ours.config.eos_token_id)
    assert want[0, 5:].tolist() == stopped


# -- tolerant loading ----------------------------------------------------------------------------


def warnings_of(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_masked_lm_checkpoint_with_next_sentence_head_loads_with_one_warning(tmp_path, caplog):
    """bert-base-cased ships BertForMaskedLM with cls.seq_relationship.* (the NSP head) in its weights."""
    ref = hf_model("BertForPreTraining", "BertConfig", BERT)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    with caplog.at_level("WARNING", logger="llm"):
        ours = from_hf(tmp_path).eval()
    (message,) = warnings_of(caplog, "does not use")
    assert "cls.seq_relationship.weight" in message and "cls.seq_relationship.bias" in message
    assert ours.task == "masked_lm" and ours.nsp is None
    mlm = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    x = inputs("BertForMaskedLM")
    keep = x["attention_mask"].bool()
    with torch.no_grad():
        assert rel_err(ours(**x).logits[keep], mlm(**x).logits[keep]) < 1e-5


@pytest.mark.parametrize(
    "arch, config_class, kwargs, drop",
    [
        ("BertForPreTraining", "BertConfig", BERT, "cls.seq_relationship."),
        ("LlamaForCausalLM", "LlamaConfig", LLAMA, "lm_head."),
        ("ViTForMaskedImageModeling", "ViTConfig", VIT, "vit.embeddings.mask_token"),
        ("ViTForImageClassification", "ViTConfig", {**VIT, "num_labels": 3}, "classifier."),
    ],
)
def test_missing_optional_modules_are_initialised_with_one_warning(arch, config_class, kwargs, drop, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    hf_model(arch, config_class, kwargs).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.startswith(drop)}
    assert len(kept) < len(tensors)
    save_file(kept, str(tmp_path / "model.safetensors"))
    with caplog.at_level("WARNING", logger="llm"):
        from_hf(tmp_path)
    (message,) = warnings_of(caplog, "freshly initialised")
    named = set(message.split(": ", 2)[-1].split(", "))
    assert named == set(tensors) - set(kept), message
    # transformers tolerates the same checkpoint, and reports the same tensors missing
    _, info = getattr(transformers, arch).from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == named


def test_missing_trunk_tensor_is_still_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model("LlamaForCausalLM", "LlamaConfig", LLAMA).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(UserError, match="LlamaForCausalLM lack layers.1.mlp.up_proj.weight"):
        from_hf(tmp_path)


def test_llm_directory_with_an_extra_tensor_loads_with_one_warning(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from llm.run.loader import load_pretrained, save_pretrained
    from tests.conftest import build

    model = build(dict(family="gpt", vocab_size=50, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    save_pretrained(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({**tensors, "old_head.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with caplog.at_level("WARNING", logger="llm"):
        loaded = load_pretrained(tmp_path)
    (message,) = warnings_of(caplog, "does not use")
    assert "old_head.weight" in message
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


# -- rotary tables under casts -------------------------------------------------------------------


def test_rotary_tables_stay_float32_under_a_bf16_cast(tmp_path):
    hf_model("LlamaForCausalLM", "LlamaConfig", {**LLAMA, "max_position_embeddings": 8192}).save_pretrained(tmp_path)
    for model in (from_hf(tmp_path).to(torch.bfloat16), from_hf(tmp_path, dtype=torch.bfloat16)):
        rotary = model.transformer.rotary
        assert rotary.inv_freq.dtype == torch.float32 and model.transformer.tok_embed.weight.dtype == torch.bfloat16
        d, theta = model.config.head_dim, model.config.rope_theta
        exact = 4000 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # float64 reference
        cos, _ = rotary(torch.tensor([[4000]]), torch.float32)
        assert (cos[0, 0, : d // 2].double() - exact.cos()).abs().max() < 1e-3
        # back to float32: the tables are the float32 ones again, bit for bit
        assert torch.equal(model.float().transformer.rotary.inv_freq, from_hf(tmp_path).transformer.rotary.inv_freq)
