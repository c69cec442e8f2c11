"""Roofline of every benchmark shape: FLOPs, bytes moved and the lower-bound time on H100 SXM and H200.

A kernel can be no faster than ``max(FLOPs / peak rate, bytes / memory bandwidth)``; every GPU table
(``bench/gpu_check.py``) prints its figures beside this bound.  Bytes count each operand read once and each output
written once (the minimum traffic: perfect reuse through caches), at the operands' element size.

    python bench/roofline.py                  # the linear, mixed-task, conv and rsvd shapes, bf16
    python bench/roofline.py --dtype float32

Peak rates are the vendors' dense figures: 989 TFLOP/s bf16/fp16 tensor core (494 TF32, 67 plain fp32), 3.35 TB/s
HBM3 (H100 SXM 80 GB) and 4.8 TB/s HBM3e (H200 141 GB).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float  # bytes / s
    tensor_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    tf32_flops: float
    fp32_flops: float  # plain (CUDA-core) fp32 FLOP/s


DEVICES = {
    "H100-SXM": Device("H100 SXM", 3.35e12, 989e12, 494e12, 67e12),
    "H200": Device("H200", 4.8e12, 989e12, 494e12, 67e12),
}

ELEMENT_BYTES = {"float32": 4, "tf32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Cost:
    """The work of one call: ``flops`` and the minimum ``bytes`` moved."""

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    @property
    def intensity(self) -> float:
        return self.flops / max(self.bytes, 1.0)


def peak_flops(device: Device, dtype: str) -> float:
    return {"float32": device.fp32_flops, "tf32": device.tf32_flops}.get(dtype, device.tensor_flops)


def bound_ms(cost: Cost, device: Device, dtype: str) -> float:
    """The lower-bound time of ``cost`` on ``device`` in milliseconds."""
    return max(cost.flops / peak_flops(device, dtype), cost.bytes / device.bandwidth) * 1e3


def limit(cost: Cost, device: Device, dtype: str) -> str:
    """Which resource bounds ``cost``: ``"memory"`` or ``"compute"``."""
    return "compute" if cost.flops / peak_flops(device, dtype) >= cost.bytes / device.bandwidth else "memory"


# ------------------------------------------------------------------------------------------------
# the costs of the benchmarked ops
# ------------------------------------------------------------------------------------------------
def dense_linear(M: int, N: int, K: int, dtype: str) -> Cost:
    """``y (M, N) = x (M, K) Wᵀ + b``."""
    e = ELEMENT_BYTES[dtype]
    return Cost(2.0 * M * N * K, (M * K + N * K + M * N + N) * e)


def perturbed_linear(M: int, N: int, K: int, rank: int, dtype: str, tasks: int = 1) -> Cost:
    """``y = r ⊙ ((s ⊙ x) Wᵀ) + (x V) Uᵀ + b`` with ``tasks`` distinct tasks' r, s, U, V, b read once each."""
    e = ELEMENT_BYTES[dtype]
    flops = 2.0 * M * (N * K + rank * (N + K)) + 2.0 * M * (N + K)
    per_task = rank * (N + K) + 2 * N + K
    return Cost(flops, (M * K + N * K + M * N + tasks * per_task) * e)


def perturbed_linear_fwd_bwd(M: int, N: int, K: int, rank: int, dtype: str) -> Cost:
    """Forward plus the backward for x, r, s, U, V, b (W frozen): dx = (s ⊙ (g ⊙ r) W) + (g U) Vᵀ and the
    per-task reductions; reads g, x, W, the saved ``c`` (M, N) and writes dx and the small gradients."""
    e = ELEMENT_BYTES[dtype]
    bwd_flops = 2.0 * M * N * K + 4.0 * M * rank * (N + K) + 6.0 * M * (N + K)
    bwd_bytes = (2 * M * N + 2 * M * K + N * K + 2 * (rank * (N + K) + 2 * N + K)) * e
    save = M * N * e  # the forward writes c for dr
    return perturbed_linear(M, N, K, rank, dtype) + Cost(bwd_flops, bwd_bytes + save)


def dense_conv(batch: int, c_in: int, c_out: int, hw: int, kernel: int, padding: int, dtype: str) -> Cost:
    """``F.conv2d`` at stride 1: ``(batch, c_in, hw, hw) → (batch, c_out, h_out, h_out)``."""
    e = ELEMENT_BYTES[dtype]
    out = hw + 2 * padding - kernel + 1
    flops = 2.0 * batch * out * out * c_out * c_in * kernel * kernel
    return Cost(flops, (batch * c_in * hw * hw + c_out * c_in * kernel * kernel + batch * c_out * out * out) * e)


def perturbed_conv(batch: int, c_in: int, c_out: int, hw: int, kernel: int, padding: int, rank: int,
                   dtype: str) -> Cost:
    """The dense conv of ``s ⊙ x`` plus the low-rank term ``U · Σ_window(Vᵀ x)`` and the ``r``, ``b`` epilogue."""
    out = hw + 2 * padding - kernel + 1
    e = ELEMENT_BYTES[dtype]
    lowrank = Cost(2.0 * batch * rank * (c_in * hw * hw + kernel * kernel * out * out + c_out * out * out),
                   rank * (c_in + c_out) * e)
    return dense_conv(batch, c_in, c_out, hw, kernel, padding, dtype) + lowrank


def rsvd(batch: int, m: int, n: int, rank: int, power_iters: int = 2, oversample: int = 10) -> Cost:
    """Randomized SVD of ``batch`` (m, n) fp32 matrices: ``2 + 2·power_iters`` passes over A with ``q = rank +
    oversample`` columns, QR of (m, q) blocks and the SVD of the (q, n) projection."""
    q = rank + oversample
    passes = 2 + 2 * power_iters
    flops = batch * (passes * 2.0 * m * n * q + (passes // 2 + 1) * 4.0 * m * q * q + 4.0 * q * q * n)
    return Cost(flops, batch * (passes * m * n + (m + n) * q) * 4.0)


# ------------------------------------------------------------------------------------------------
# the benchmark shapes
# ------------------------------------------------------------------------------------------------
LINEAR_SHAPES = [(M, NK, k) for M in (1, 16, 128, 2048, 8192) for NK in (1024, 4096) for k in (8, 64)]
MIXED_SHAPES = [(M, 4096, 8, T) for M in (128, 2048) for T in (8, 32)]
CONV_LAYERS = [("lenet.conv2", 20, 50, 16, 5, 2), ("alexnet.conv2", 64, 128, 14, 3, 0),
               ("resnet.layer2", 64, 64, 16, 3, 1)]
RSVD_SHAPES = [(B, side, k) for B in (16, 64) for side in (256, 1024, 4096) for k in (16, 64)]


def table(dtype: str) -> list[list]:
    rows = []

    def row(kind, shape, cost, dt=dtype):
        bounds = [bound_ms(cost, d, dt) * 1e3 for d in DEVICES.values()]
        rows.append([kind, shape, f"{cost.flops / 1e9:.3g}", f"{cost.bytes / 1e6:.3g}", f"{cost.intensity:.1f}",
                     *(f"{b:.2f}" for b in bounds), limit(cost, DEVICES["H100-SXM"], dt)])

    for M, NK, k in LINEAR_SHAPES:
        if k == LINEAR_SHAPES[0][2]:
            row("dense linear", f"M={M} N=K={NK}", dense_linear(M, NK, NK, dtype))
        row("perturbed linear", f"M={M} N=K={NK} rank={k}", perturbed_linear(M, NK, NK, k, dtype))
        if M >= 16:
            row("fwd+bwd", f"M={M} N=K={NK} rank={k}", perturbed_linear_fwd_bwd(M, NK, NK, k, dtype))
    for M, NK, k, T in MIXED_SHAPES:
        row("mixed linear", f"M={M} N=K={NK} rank={k} tasks={T}", perturbed_linear(M, NK, NK, k, dtype, T))
    for name, c_in, c_out, hw, kern, pad in CONV_LAYERS:
        for batch in (32, 256):
            row("perturbed conv", f"{name} batch={batch} rank=8",
                perturbed_conv(batch, c_in, c_out, hw, kern, pad, 8, dtype))
    for B, side, k in RSVD_SHAPES:
        row("rsvd (fp32)", f"B={B} {side}x{side} rank={k}", rsvd(B, side, side, k), "float32")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=list(ELEMENT_BYTES))
    args = ap.parse_args(argv)
    from _common import markdown_table

    header = ["kind", "shape", "GFLOP", "MB", "FLOP/B", *(f"{d.name} bound µs" for d in DEVICES.values()),
              "limit (H100)"]
    print(markdown_table(header, table(args.dtype)))


if __name__ == "__main__":
    main()
