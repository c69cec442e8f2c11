"""Microbenchmark of the perturbed conv layer: ``r ⊙ conv(s ⊙ x, W) + U · Σ_window(Vᵀ · x) + b``.

Every row times, in the same run: the plain ``F.conv2d`` (the floor), the eager PyTorch formulation
(scale, conv, 1×1 conv by Vᵀ, window sum, 1×1 conv by U, add), ``torch.compile`` of it, our op (the provider
``halrp-fast env`` names), and the merged-weight conv that single-task inference uses.  Mixed batches compare
our mixed-task op with a Python loop over the distinct tasks; fwd+bwd compares training steps.

    python bench/bench_perturbed_conv.py            # CPU: reduced shapes
    python bench/bench_perturbed_conv.py --full     # larger batches (GPU)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import environment_line, markdown_table, median_ms, parse_args

import halrp_fast as hf
from halrp_fast._math import merge_conv_weight, window_sum

# (name, C_in, C_out, H=W, kernel, padding): layers of the paper's networks
LAYERS = [("lenet.conv2", 20, 50, 16, 5, 2), ("alexnet.conv2", 64, 128, 14, 3, 0), ("resnet.layer2", 64, 64, 16, 3, 1)]


def eager(x, W, r, s, U, V, b, padding):
    kh, kw = W.shape[-2:]
    z = F.conv2d(x, V.T[:, :, None, None])
    pooled = window_sum(z, (kh, kw), (1, 1), (padding, padding), (1, 1))
    return (F.conv2d(x * s[:, None, None], W, None, 1, padding) * r[:, None, None]
            + F.conv2d(pooled, U[:, :, None, None]) + b[:, None, None])


def _tensors(N, c_in, c_out, hw, kern, k, dtype, device, T=None):
    g = dict(dtype=dtype, device=device)
    lead = () if T is None else (T,)
    x = torch.randn(N, c_in, hw, hw, **g)
    W = torch.randn(c_out, c_in, kern, kern, **g) / (c_in * kern * kern) ** 0.5
    return (x, W, torch.randn(*lead, c_out, **g), torch.randn(*lead, c_in, **g),
            0.1 * torch.randn(*lead, c_out, k, **g), 0.1 * torch.randn(*lead, c_in, k, **g),
            torch.randn(*lead, c_out, **g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    args = parse_args(parser)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = (32, 256) if args.full else (8, 32)
    torch._dynamo.config.recompile_limit = 64  # one compiled function serves every shape of the table
    compiled = None if args.no_compile else torch.compile(eager)
    rows = []
    for name, c_in, c_out, hw, kern, pad in LAYERS:
        for N in batches:
            for k in (8, 32):
                x, W, r, s, U, V, b = _tensors(N, c_in, c_out, hw, kern, k, dtype, device)
                with torch.no_grad():
                    Wm = merge_conv_weight(W, r, s, U, V)
                    t_dense = median_ms(lambda: F.conv2d(x, W, b, 1, pad), device)
                    t_eager = median_ms(lambda: eager(x, W, r, s, U, V, b, pad), device)
                    t_comp = median_ms(lambda: compiled(x, W, r, s, U, V, b, pad), device) if compiled else float("nan")
                    t_ours = median_ms(lambda: hf.perturbed_conv2d(x, W, r, s, U, V, b, padding=pad), device)
                    t_merged = median_ms(lambda: F.conv2d(x, Wm, b, 1, pad), device)
                rows.append(["fwd", name, N, k, 1, t_dense, t_eager, t_comp, t_ours, t_merged, t_ours / t_dense,
                             t_eager / t_ours])
                params = [p.requires_grad_() for p in (x, r, s, U, V, b)]
                gy = torch.randn(N, c_out, hw + 2 * pad - kern + 1, hw + 2 * pad - kern + 1, dtype=dtype,
                                 device=device)
                t_eager_b = median_ms(lambda: torch.autograd.grad(eager(x, W, r, s, U, V, b, pad), params, gy), device)
                t_ours_b = median_ms(lambda: torch.autograd.grad(
                    hf.perturbed_conv2d(x, W, r, s, U, V, b, padding=pad), params, gy), device)
                rows.append(["fwd+bwd", name, N, k, 1, float("nan"), t_eager_b, float("nan"), t_ours_b, float("nan"),
                             float("nan"), t_eager_b / t_ours_b])
        N, k = batches[-1], 8
        for T in (8,):
            x, W, R, S, U, V, B = _tensors(N, c_in, c_out, hw, kern, k, dtype, device, T=T)
            ids = torch.arange(N, device=device) % T
            groups = [(t, (ids == t).nonzero().flatten()) for t in range(T)]

            def loop():
                out = torch.empty(N, c_out, *F.conv2d(x[:1], W, None, 1, pad).shape[2:], dtype=dtype, device=device)
                for t, idx in groups:
                    out[idx] = eager(x[idx], W, R[t], S[t], U[t], V[t], B[t], pad)
                return out

            with torch.no_grad():
                t_dense = median_ms(lambda: F.conv2d(x, W, None, 1, pad), device)
                t_loop = median_ms(loop, device)
                t_ours = median_ms(lambda: hf.perturbed_conv2d_mt(x, ids, W, R, S, U, V, B, padding=pad), device)
            rows.append(["mixed", name, N, k, T, t_dense, t_loop, float("nan"), t_ours, float("nan"),
                         t_ours / t_dense, t_loop / t_ours])
    print(environment_line(device) + f", dtype {dtype}, ops via: {hf._backend.select('perturbed_conv2d', device)[0]}")
    print(markdown_table(["kind", "layer", "N", "rank", "tasks", "dense ms", "baseline ms", "compiled ms", "ours ms",
                          "merged ms", "ours/dense", "baseline/ours"], rows))
    print("baseline = eager formulation (fwd, fwd+bwd) or a Python loop over the distinct tasks (mixed); "
          "merged = one conv with diag(r) W diag(s) + U Vᵀ (single-task inference)")


if __name__ == "__main__":
    main()
