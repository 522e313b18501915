"""The family adapters (llm.models.hf) against transformers: every architecture an adapter
claims is a transformers class, and a random one of it comes back from llm with every tensor,
under the same names, exactly. A new family adds its model types to TINY."""

import typing

import pytest
import torch

from llm.errors import UserError
from llm.models.config import Family
from llm.models.hf import ADAPTERS, architectures
from llm.tasks import build_model, get_task
from llm.tasks.hf import from_hf, to_hf

transformers = pytest.importorskip("transformers")

# A tiny config.json per Hugging Face model type the adapters read
TEXT = dict(vocab_size=101, bos_token_id=1, eos_token_id=2)
DECODER = dict(TEXT, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
DECODER.update(num_key_value_heads=2, max_position_embeddings=64)
ENCODER = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
TINY = {
    "gpt2": dict(TEXT, n_embd=48, n_layer=2, n_head=4, n_positions=40, pad_token_id=0),
    "llama": dict(DECODER, pad_token_id=0),
    "mistral": dict(DECODER, sliding_window=None, pad_token_id=0),
    "qwen2": dict(DECODER, pad_token_id=0),
    "qwen3": dict(DECODER, head_dim=12, pad_token_id=0),
    "bert": dict(ENCODER, vocab_size=101, max_position_embeddings=40, type_vocab_size=3, pad_token_id=0),
    "vit": dict(ENCODER, image_size=12, patch_size=4, encoder_stride=4, num_channels=3),
}


def test_the_registry_names_every_family_once_and_only_what_transformers_and_llm_know():
    assert set(ADAPTERS) == set(typing.get_args(Family))
    model_types = [t for a in ADAPTERS.values() for t in a.model_types]
    assert len(model_types) == len(set(model_types)) and set(model_types) == set(TINY)
    assert sum(len(a.architectures) for a in ADAPTERS.values()) == len(architectures())  # no name twice
    for arch, (adapter, task, implied) in architectures().items():
        model_type = getattr(transformers, arch).config_class.model_type
        assert model_type in adapter.model_types, arch
        assert get_task({"name": task, **implied}).name == task
    for adapter in ADAPTERS.values():
        assert set(adapter.model_types.values()) <= set(adapter.architectures)


@pytest.mark.parametrize("arch", sorted(architectures()))
def test_every_architecture_comes_back_from_llm_tensor_for_tensor(arch, tmp_path):
    cls = getattr(transformers, arch)
    torch.manual_seed(0)
    ref = cls(cls.config_class(**TINY[cls.config_class.model_type])).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms and biases away from their initial values
    ref.save_pretrained(tmp_path / "hf")
    to_hf(from_hf(tmp_path / "hf"), tmp_path / "back")
    exported = transformers.AutoConfig.from_pretrained(tmp_path / "back").architectures[0]  # Mistral's: Llama
    back, info = getattr(transformers, exported).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    restored = back.state_dict()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, restored[name]), name


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_pooler_that_transformers_lacks_is_refused_by_name(family, tmp_path):
    """GPT-2 and LLaMA classes have no pooler: a model with one has no Hugging Face form."""
    from llm.run.formats.hf import check

    fields = dict(family=family, vocab_size=50, max_seq_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    if family == "llama":
        fields.update(norm="rmsnorm", position="rotary", mlp="swiglu", bias=False)
    model = build_model({**fields, "pooler": True}, "text_classification")
    assert check(model) is not None
    with pytest.raises(UserError, match="model.pooler: .*ForSequenceClassification needs False, got True"):
        to_hf(model, tmp_path)
    assert check(build_model(fields, "text_classification")) is None
