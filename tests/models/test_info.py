"""Parameter counts and FLOPs against independent counts."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llm.models.config import ModelConfig, load_model_config
from llm.models.info import training_flops_per_token, zero_memory_per_rank
from llm.tasks import build_model


def test_gpt2_124m_counts_like_hugging_face():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config())
    with torch.device("meta"):
        ours = build_model(load_model_config("gpt2-124m")).num_parameters()
    assert ours == sum(p.numel() for p in hf.parameters())
    assert f"{ours:,}" == "124,439,808"


def test_llama_8b_counts_like_hugging_face():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_model_config("llama-8b")
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
        ours = build_model(cfg)
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_training_flops_match_torch_flop_counter():
    cfg = ModelConfig(vocab_size=101, max_seq_len=24, d_model=32, n_layers=2, n_heads=4, d_ff=96)
    model = build_model(cfg)
    ids = torch.randint(0, 101, (2, 24))
    # the math backend spells attention as matmuls, which the counter sees
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, labels=ids, return_logits=False).loss.backward()
    measured = counter.get_total_flops() / ids.numel()
    assert abs(measured - training_flops_per_token(model, 24)) / measured < 1e-9


def test_zero_memory_shards_the_right_parts():
    n, ranks = 1_000_000, 8
    totals = [zero_memory_per_rank(n, ranks, s)["total"] for s in range(4)]
    assert totals[0] == 16 * n
    assert totals[1] == 4 * n + 12 * n / ranks
    assert totals[2] == 2 * n + 14 * n / ranks
    assert totals[3] == 16 * n / ranks
