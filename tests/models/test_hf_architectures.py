"""More Hugging Face architectures on the LLaMA trunk: Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms),
and LLaMA's rope scalings (linear, dynamic, llama3, yarn), each against `transformers` on a small
random model: logits (fp32) within 1e-5 both ways, and every tensor back exactly."""

import json

import pytest
import torch

from llm.errors import UserError
from llm.tasks.hf import from_hf, to_hf
from tests.conftest import rel_err
from tests.models.test_hf import LLAMA, hf_model

transformers = pytest.importorskip("transformers")

SMALL = {k: v for k, v in LLAMA.items() if k not in ("rope_theta",)}
SMALL.update(num_key_value_heads=2, rope_theta=500.0)
ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0},
}
THETA = {"rope_theta": 500.0}
CASES = {
    "mistral": ("MistralForCausalLM", "MistralConfig", {**SMALL, "sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", SMALL),
    "qwen2-tied": ("Qwen2ForCausalLM", "Qwen2Config", {**SMALL, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {**SMALL, "head_dim": 12}),
    **{
        f"llama-rope-{name}": ("LlamaForCausalLM", "LlamaConfig", {**SMALL, "rope_parameters": {**THETA, **r}})
        for name, r in ROPE.items()
    },
}


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_parity_both_ways_and_exact_round_trip(case, tmp_path):
    arch, config_class, kwargs = CASES[case]
    ref = hf_model(arch, config_class, kwargs)
    ref.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()
    # 100 positions: beyond max_position_embeddings (64), where dynamic scaling starts to act
    ids = torch.randint(0, 101, (2, 100))
    assert rel_err(logits_of(ours, ids), logits_of(ref, ids)) < 1e-5

    to_hf(ours, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [arch if arch != "MistralForCausalLM" else "LlamaForCausalLM"]
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert rel_err(logits_of(back, ids), logits_of(ours, ids)) < 1e-5
    original, restored = ref.state_dict(), back.state_dict()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name


def test_qwen2_has_qkv_biases_only_and_qwen3_has_qk_norms(tmp_path):
    hf_model("Qwen2ForCausalLM", "Qwen2Config", SMALL).save_pretrained(tmp_path / "q2")
    hf_model("Qwen3ForCausalLM", "Qwen3Config", {**SMALL, "head_dim": 12}).save_pretrained(tmp_path / "q3")
    q2, q3 = from_hf(tmp_path / "q2").config, from_hf(tmp_path / "q3").config
    assert (q2.attn_bias, q2.bias, q2.qk_norm) == (True, False, False)
    assert (q3.attn_bias, q3.bias, q3.qk_norm) == (False, False, True)


def test_unsupported_variants_are_refused_by_name(tmp_path):
    ref = hf_model("MistralForCausalLM", "MistralConfig", {**SMALL, "sliding_window": 16})
    ref.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="sliding_window=16 < max_position_embeddings=64"):
        from_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(sliding_window=None, rope_parameters={"rope_type": "longrope", "rope_theta": 500.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="rope scaling 'longrope' is not supported"):
        from_hf(tmp_path)
