"""Parameter counts and FLOPs against independent counts."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llm.models.config import ModelConfig, load_model_config
from llm.models.info import activation_memory_per_rank, training_flops_per_token, zero_memory_per_rank
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


def test_activation_memory_is_korthikantis_divided_by_the_sequence_size():
    """Korthikanti et al. 2022: eq. 2 (no parallelism) s b h (34 + 5 a s / h) bytes per layer, eq. 3 (tensor
    parallel t) s b h (10 + 24 / t + 5 a s / (h t)); flash attention stores no a s^2 scores; full recomputation
    keeps 2 s b h per layer. Ulysses over N ranks divides each by N."""
    cfg = load_model_config("gpt2-124m")
    s, b, h, a, layers = 1024, 2, cfg.d_model, cfg.n_heads, cfg.n_layers
    one = activation_memory_per_rank(cfg, s, b)
    assert one["eager"] == pytest.approx(layers * s * b * h * (34 + 5 * a * s / h))
    assert one["fused"] == pytest.approx(layers * s * b * h * 34)
    assert one["checkpointed"] == pytest.approx(layers * 2 * s * b * h + s * b * h * 34)
    assert activation_memory_per_rank(cfg, s, b, tensor=2)["eager"] == pytest.approx(
        layers * s * b * h * (10 + 24 / 2 + 5 * a * s / (h * 2))
    )
    four = activation_memory_per_rank(cfg, s, b, sequence=4)
    assert all(four[k] == pytest.approx(one[k] / 4) for k in one)


def test_model_info_shards_zero_over_all_ranks_and_refuses_a_mesh_that_does_not_fit(capsys):
    from llm.cli import main

    assert main(["model", "info", "gpt2-124m", "--ranks", "8", "--sequence", "2", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    n = 124_439_808
    assert "8 ranks = 4 data x 2 sequence x 1 tensor" in out
    assert f"{16 * n / 8 / 2**30:,.2f} GiB" in out.splitlines()[8]  # ZeRO-3 over all 8 ranks
    assert "2048 positions per rank" in out
    assert main(["model", "info", "gpt2-124m", "--ranks", "8", "--sequence", "8"]) == 2  # 12 heads over 8
    assert "model.n_heads: 12 query heads do not divide over parallel.sequence=8" in capsys.readouterr().err


def test_model_info_counts_what_a_tensor_parallel_rank_holds(capsys):
    """Llama-3-8B over tensor 8: each rank holds 1/8 of every block's q, k, v, o, gate, up and down weights, and
    the embeddings, the untied output and the norms whole; ZeRO shards those over the 16 / 8 data-parallel ranks
    (llm's tensor parallelism runs with ZeRO 0-2, so the table stops at 2). The 2-rank training test checks the
    count against a real rank's parameters (tests/train/test_tensor_parallel.py)."""
    from llm.cli import main

    assert main(["model", "info", "llama-8b", "--ranks", "16", "--tensor", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    v, d, layers, kv, d_ff = 128256, 4096, 32, 8 * 128, 14336
    split = layers * (d * (d + 2 * kv) + d * d + 3 * d * d_ff)
    per_rank = split // 8 + layers * 2 * d + d + 2 * v * d
    assert f"{per_rank:,} per tensor-parallel rank" in out[1]
    assert "16 ranks = 2 data x 1 sequence x 8 tensor" in out[3]
    assert f"{16 * per_rank / 2**30:,.2f} GiB" in out[5]  # ZeRO 0: all of a rank's 16 bytes per parameter
    assert f"{(2 + 2 + 12 / 2) * per_rank / 2**30:,.2f} GiB" in out[6]  # ZeRO 1: the optimizer over 2
    assert not any(line.strip().startswith("3 ") for line in out)
