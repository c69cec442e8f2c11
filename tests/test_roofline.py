"""bench/roofline.py: FLOPs, bytes and lower-bound times of the benchmark shapes, against counts done by hand."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import roofline as rl  # noqa: E402

H100, H200 = rl.DEVICES["H100-SXM"], rl.DEVICES["H200"]


def test_dense_linear_counts_and_compute_bound():
    cost = rl.dense_linear(2048, 4096, 4096, "bfloat16")
    assert cost.flops == 2 * 2048 * 4096 * 4096
    assert cost.bytes == 2 * (2048 * 4096 + 4096 * 4096 + 2048 * 4096 + 4096)
    assert rl.limit(cost, H100, "bfloat16") == "compute"
    assert rl.bound_ms(cost, H100, "bfloat16") == pytest.approx(cost.flops / 989e12 * 1e3)


def test_decode_row_is_memory_bound_and_h200_is_faster_there():
    cost = rl.perturbed_linear(1, 4096, 4096, 8, "bfloat16")
    assert rl.limit(cost, H100, "bfloat16") == "memory"
    assert rl.bound_ms(cost, H100, "bfloat16") == pytest.approx(cost.bytes / 3.35e12 * 1e3)
    assert rl.bound_ms(cost, H200, "bfloat16") == pytest.approx(cost.bytes / 4.8e12 * 1e3)


def test_perturbation_adds_its_rank_terms_and_task_banks():
    M, N, K, k, T = 16, 96, 80, 8, 3
    dense = rl.dense_linear(M, N, K, "float32")
    one = rl.perturbed_linear(M, N, K, k, "float32")
    mixed = rl.perturbed_linear(M, N, K, k, "float32", tasks=T)
    assert one.flops == dense.flops + 2 * M * k * (N + K) + 2 * M * (N + K)
    per_task = (k * (N + K) + 2 * N + K) * 4
    assert mixed.bytes - one.bytes == (T - 1) * per_task
    assert rl.perturbed_linear_fwd_bwd(M, N, K, k, "float32").flops > 2 * one.flops


def test_conv_and_rsvd_counts():
    c = rl.dense_conv(2, 3, 5, 8, 3, 1, "float16")
    assert c.flops == 2 * 2 * 8 * 8 * 5 * 3 * 9
    assert rl.perturbed_conv(2, 3, 5, 8, 3, 1, 4, "float16").flops > c.flops
    r = rl.rsvd(2, 64, 32, 4, power_iters=1, oversample=2)
    assert r.flops >= 2 * 4 * 2 * 64 * 32 * 6  # four passes over A with q = 6 columns
    assert r.bytes >= 2 * 4 * 64 * 32 * 4


def test_table_covers_every_kind_and_rates_pick_the_type():
    kinds = {row[0] for row in rl.table("bfloat16")}
    assert kinds == {"dense linear", "perturbed linear", "fwd+bwd", "mixed linear", "perturbed conv", "rsvd (fp32)"}
    assert rl.peak_flops(H100, "float32") == 67e12 and rl.peak_flops(H100, "tf32") == 494e12
    assert rl.peak_flops(H100, "bfloat16") == 989e12
