"""`llm bench kernels` arithmetic: rates, percent of ceiling, speed-ups, memory ratios, targets."""

import pytest

from llm.bench import kernels as bench

CEILINGS = {"copy_gbps": 1000.0, "matmul_tflops": 500.0}


def test_norm_rows_rates_and_speedups():
    case = bench.norm_case("rms_norm", 1024, 4096, bench.torch.bfloat16, "cpu")
    size = 1024 * 4096 * 2
    results = {"torch": (4e-3, 100.0), "triton": (1e-3, 50.0), "apex": (2e-3, 60.0)}
    rows = {r["backend"]: r for r in bench._rows(case, "fwd+bwd", results, CEILINGS, "cuda")}
    assert rows["triton"]["rate"] == pytest.approx(5 * size / 1e-3 / 1e9)
    assert rows["triton"]["unit"] == "GB/s"
    assert rows["triton"]["pct_of_ceiling"] == pytest.approx(100 * 5 * size / 1e-3 / 1e9 / 1000.0)
    assert rows["triton"]["vs_torch"] == pytest.approx(4.0)
    assert rows["triton"]["vs_peer"] == pytest.approx(2.0)
    assert rows["apex"]["vs_peer"] is None
    assert rows["triton"]["mem_vs_torch"] == pytest.approx(0.5)


def test_attention_flops_count_half_the_square_when_causal():
    causal = bench.attention_case(2, 4, 128, 64, bench.torch.bfloat16, "cpu")
    full = bench.attention_case(2, 4, 128, 64, bench.torch.bfloat16, "cpu", causal=False)
    assert causal.flops_fwd == pytest.approx(full.flops_fwd / 2) == pytest.approx(2 * 2 * 4 * 128 * 128 * 64)
    row = bench._rows(causal, "fwd+bwd", {"torch": (1e-3, None)}, CEILINGS, "cpu")[0]
    assert row["rate"] == pytest.approx(3.5 * causal.flops_fwd / 1e-3 / 1e12)


def test_targets_are_checked_against_the_issue():
    norm = bench.norm_case("layer_norm", 16384, 4096, bench.torch.bfloat16, "cuda")
    ce = bench.cross_entropy_case(8192, 4096, 128256, bench.torch.bfloat16, "cuda")
    norm_seconds = 5 * 16384 * 4096 * 2 / 900e9  # 90% of the 1000 GB/s ceiling
    rows = bench._rows(
        norm, "fwd+bwd", {"torch": (3 * norm_seconds, 1.0), "triton": (norm_seconds, 1.0)}, CEILINGS, "cuda"
    )
    rows += bench._rows(ce, "fwd+bwd", {"torch": (1.0, 16000.0), "triton": (1.2, 5000.0)}, CEILINGS, "cuda")
    targets = {t["target"].split()[0]: t for t in bench.check_targets(rows)}
    assert targets["layer_norm"]["met"] is True
    assert targets["cross-entropy"]["met"] is False  # 5000 / 16000 > 1/4
    assert bench.check_targets([{**r, "device": "cpu"} for r in rows]) == []
