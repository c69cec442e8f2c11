"""Microbenchmark of the perturbed linear layer: ``r ⊙ ((s ⊙ x) Wᵀ) + (x V) Uᵀ + b``.

Every row times, in the same run: the plain dense layer ``F.linear`` (the floor), the eager PyTorch
formulation (scale, matmul, two low-rank matmuls, add), ``torch.compile`` of that formulation, and our op
(``halrp_fast.perturbed_linear``: the provider ``halrp-fast env`` names — Triton on CUDA, the reference path
on CPU).  Mixed batches compare our mixed-task op with a Python loop over the distinct tasks.  Medians via
``triton.testing.do_bench`` on GPU and ``torch.utils.benchmark`` on CPU.

    python bench/bench_perturbed_linear.py                 # CPU: a reduced shape set
    python bench/bench_perturbed_linear.py --full          # the full set (GPU)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import environment_line, markdown_table, median_ms, parse_args

import halrp_fast as hf


def eager(x, W, r, s, U, V, b):
    return F.linear(x * s, W) * r + (x @ V) @ U.T + b


def eager_loop_mt(x, ids, W, R, S, U, V, B, groups):
    out = torch.empty(x.shape[0], W.shape[0], dtype=x.dtype, device=x.device)
    for t, idx in groups:
        out[idx] = eager(x[idx], W, R[t], S[t], U[t], V[t], B[t])
    return out


def _tensors(M, N, K, k, dtype, device, T=None):
    g = dict(dtype=dtype, device=device)
    lead = () if T is None else (T,)
    x = torch.randn(M, K, **g)
    W = torch.randn(N, K, **g) / K**0.5
    r, s = torch.randn(*lead, N, **g), torch.randn(*lead, K, **g)
    U, V = torch.randn(*lead, N, k, **g) * 0.1, torch.randn(*lead, K, k, **g) * 0.1
    b = torch.randn(*lead, N, **g)
    return x, W, r, s, U, V, b


def _throughput(ms, M, N, K, k, dtype):
    flops = 2 * M * (N * K + k * (N + K))
    nbytes = (M * K + N * K + M * N + k * (N + K)) * torch.tensor([], dtype=dtype).element_size()
    return flops / ms / 1e9, nbytes / ms / 1e6  # TFLOP/s, GB/s


def bench_single(shapes, dtype, device, use_compile, rows):
    compiled = torch.compile(eager) if use_compile else None
    for M, NK, k in shapes:
        x, W, r, s, U, V, b = _tensors(M, NK, NK, k, dtype, device)
        with torch.no_grad():
            t_dense = median_ms(lambda: F.linear(x, W, b), device)
            t_eager = median_ms(lambda: eager(x, W, r, s, U, V, b), device)
            t_comp = median_ms(lambda: compiled(x, W, r, s, U, V, b), device) if compiled else float("nan")
            t_ours = median_ms(lambda: hf.perturbed_linear(x, W, r, s, U, V, b), device)
        tflops, gbs = _throughput(t_ours, M, NK, NK, k, dtype)
        rows.append(["fwd", M, NK, k, 1, t_dense, t_eager, t_comp, t_ours, t_ours / t_dense, t_eager / t_ours,
                     tflops, gbs])


def bench_fwd_bwd(shapes, dtype, device, rows):
    for M, NK, k in shapes:
        x, W, r, s, U, V, b = _tensors(M, NK, NK, k, dtype, device)
        params = [p.requires_grad_() for p in (x, r, s, U, V, b)]
        gy = torch.randn(M, NK, dtype=dtype, device=device)

        def step(fn):
            grads = torch.autograd.grad(fn(x, W, r, s, U, V, b), params, gy)
            return grads

        xd = x.detach().requires_grad_()
        t_dense = median_ms(lambda: torch.autograd.grad(F.linear(xd, W, b.detach()), [xd], gy), device)
        t_eager = median_ms(lambda: step(eager), device)
        t_ours = median_ms(lambda: step(hf.perturbed_linear), device)
        rows.append(["fwd+bwd", M, NK, k, 1, t_dense, t_eager, float("nan"), t_ours, t_ours / t_dense,
                     t_eager / t_ours, float("nan"), float("nan")])


def bench_mixed(shapes, distinct, dtype, device, rows):
    for M, NK, k in shapes:
        for T in distinct:
            if T > M:
                continue
            x, W, R, S, U, V, B = _tensors(M, NK, NK, k, dtype, device, T=T)
            ids = torch.arange(M, device=device) % T
            ids = ids[torch.randperm(M, device=device)]
            groups = [(t, (ids == t).nonzero().flatten()) for t in range(T)]
            with torch.no_grad():
                t_dense = median_ms(lambda: F.linear(x, W), device)
                t_loop = median_ms(lambda: eager_loop_mt(x, ids, W, R, S, U, V, B, groups), device)
                t_ours = median_ms(lambda: hf.perturbed_linear_mt(x, ids, W, R, S, U, V, B), device)
            rows.append(["mixed", M, NK, k, T, t_dense, t_loop, float("nan"), t_ours, t_ours / t_dense,
                         t_loop / t_ours, float("nan"), float("nan")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--full", action="store_true", help="M ∈ {1,16,128,2048,8192}, N=K ∈ {1024,4096}")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parse_args(parser)
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if args.full:
        Ms, NKs = (1, 16, 128, 2048, 8192), (1024, 4096)
    else:
        Ms, NKs = (1, 16, 128), (1024,)
    shapes = [(M, NK, k) for M in Ms for NK in NKs for k in (8, 64)]
    rows: list[list] = []
    bench_single(shapes, dtype, device, not args.no_compile, rows)
    bench_fwd_bwd([s for s in shapes if s[0] >= 16], dtype, device, rows)
    bench_mixed([s for s in shapes if s[0] >= 16], (1, 8, 32), dtype, device, rows)
    print(environment_line(device) + f", dtype {dtype}, ops via: {hf._backend.select('perturbed_linear', device)[0]}")
    print(markdown_table(
        ["kind", "M", "N=K", "rank", "tasks", "dense ms", "baseline ms", "compiled ms", "ours ms", "ours/dense",
         "baseline/ours", "TFLOP/s", "GB/s"], rows))
    print("baseline = eager formulation (fwd, fwd+bwd) or a Python loop over the distinct tasks (mixed); "
          "compiled = torch.compile of the eager formulation")


if __name__ == "__main__":
    main()
