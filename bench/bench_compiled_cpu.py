"""CPU tables of the compiled extension (halrp_fast._C) against the Python paths, measured in the same run.

For the mixed-task linear and conv ops (conv in NCHW and channels-last) at M ∈ {1, 32, 256} rows / images and {1, 8, 32}
distinct tasks:

* ``dense``: the plain layer on the whole batch (``F.linear`` / ``F.conv2d``): the floor;
* ``loop``: the eager formulation (scale, matmul/conv, two low-rank products, add) in a Python loop over the
  distinct tasks of the batch;
* ``torch``: the mixed-task op on its pure-PyTorch provider (``HALRP_FAST_BACKEND=reference``);
* ``cpp``: the same op on the compiled C++ kernels (``HALRP_FAST_BACKEND=cpp``).

A third table times the least-squares scalings of the rank-estimation step (``halrp_fast.linalg.fit_scalings``)
on the layer shapes of the paper's networks.  Medians of ``torch.utils.benchmark`` with the process's threads.

    python bench/bench_compiled_cpu.py            # N=K ∈ {256, 1024}, rank 8
    python bench/bench_compiled_cpu.py --rank 64
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from _common import environment_line, markdown_table, median_ms, parse_args
from bench_perturbed_linear import eager_loop_mt

import halrp_fast as hf
from halrp_fast import _ext
from halrp_fast.linalg import fit_scalings


def on_provider(name: str, fn):
    """``fn`` run with HALRP_FAST_BACKEND=name."""

    def run():
        os.environ["HALRP_FAST_BACKEND"] = name
        return fn()

    return run


def _banks(T, n_in, n_out, k, g):
    return (torch.randn(T, n_out, **g), torch.randn(T, n_in, **g), 0.1 * torch.randn(T, n_out, k, **g),
            0.1 * torch.randn(T, n_in, k, **g), torch.randn(T, n_out, **g))


def _mixed_ids(M, T):
    ids = torch.arange(M) % T
    return ids[torch.randperm(M)]


def _row(kind, shape, M, T, t_dense, t_loop, t_torch, t_cpp):
    return [kind, shape, M, T, t_dense, t_loop, t_torch, t_cpp, t_loop / t_cpp, t_torch / t_cpp, t_cpp / t_dense]


def bench_linear(NKs, Ms, Ts, k, rows):
    g = dict(dtype=torch.float32)
    for NK in NKs:
        W = torch.randn(NK, NK, **g) / NK**0.5
        for M in Ms:
            for T in Ts:
                if T > M:
                    continue
                x, ids = torch.randn(M, NK, **g), _mixed_ids(M, T)
                R, S, U, V, B = _banks(T, NK, NK, k, g)
                groups = [(t, (ids == t).nonzero().flatten()) for t in range(T)]
                def op():
                    return hf.perturbed_linear_mt(x, ids, W, R, S, U, V, B)
                with torch.no_grad():
                    t_dense = median_ms(lambda: F.linear(x, W))
                    t_loop = median_ms(lambda: eager_loop_mt(x, ids, W, R, S, U, V, B, groups))
                    t_torch = median_ms(on_provider("reference", op))
                    t_cpp = median_ms(on_provider("cpp", op))
                rows.append(_row("linear", f"{NK}x{NK} k={k}", M, T, t_dense, t_loop, t_torch, t_cpp))


def eager_conv(x, W, r, s, U, V, b, padding):
    lowrank = (U @ V.T)[:, :, None, None].expand_as(W)
    return F.conv2d(x * s[:, None, None], W, None, 1, padding) * r[:, None, None] + \
        F.conv2d(x, lowrank, None, 1, padding) + b[:, None, None]


def eager_conv_loop(x, ids, W, R, S, U, V, B, groups, padding):
    out = torch.empty(x.shape[0], W.shape[0], x.shape[2], x.shape[3])
    for t, idx in groups:
        out[idx] = eager_conv(x[idx], W, R[t], S[t], U[t], V[t], B[t], padding)
    return out


def bench_conv(Ms, Ts, k, rows, layout, C=32, Co=32, H=16):
    g = dict(dtype=torch.float32)
    W = (torch.randn(Co, C, 3, 3, **g) / (3 * C**0.5)).to(memory_format=layout)
    name = "NCHW" if layout == torch.contiguous_format else "channels-last"
    for M in Ms:
        for T in Ts:
            if T > M:
                continue
            x, ids = torch.randn(M, C, H, H, **g).to(memory_format=layout), _mixed_ids(M, T)
            R, S, U, V, B = _banks(T, C, Co, k, g)
            groups = [(t, (ids == t).nonzero().flatten()) for t in range(T)]
            def op():
                return hf.perturbed_conv2d_mt(x, ids, W, R, S, U, V, B, padding=1)
            with torch.no_grad():
                t_dense = median_ms(lambda: F.conv2d(x, W, None, 1, 1))
                t_loop = median_ms(lambda: eager_conv_loop(x, ids, W, R, S, U, V, B, groups, 1))
                t_torch = median_ms(on_provider("reference", op))
                t_cpp = median_ms(on_provider("cpp", op))
            rows.append(_row("conv", f"{C}->{Co} {H}x{H} 3x3 k={k} {name}", M, T, t_dense, t_loop, t_torch, t_cpp))


SCALING_SHAPES = {  # (out, in[, kh, kw]) of the paper's networks' layers
    "LeNet conv2 50x20x5x5": (50, 20, 5, 5),
    "LeNet fc1 800x3200": (800, 3200),
    "AlexNet conv3 256x128x2x2": (256, 128, 2, 2),
    "AlexNet fc1 2048x1024": (2048, 1024),
    "ResNet-18 conv 256x256x3x3": (256, 256, 3, 3),
    "4096x4096": (4096, 4096),
}


def bench_scalings(rows):
    for name, shape in SCALING_SHAPES.items():
        W = torch.randn(*shape)
        Wf = W + 0.1 * torch.randn(*shape)
        t_torch = median_ms(on_provider("reference", lambda: fit_scalings(Wf, W)))
        t_cpp = median_ms(on_provider("cpp", lambda: fit_scalings(Wf, W)))
        rows.append([name, t_torch, t_cpp, t_torch / t_cpp])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="N = K of the linear layer")
    args = parse_args(parser)
    if _ext.load() is not None:
        raise SystemExit(f"halrp_fast._C is not available: {_ext.load()}")
    torch.manual_seed(0)
    Ms, Ts = (1, 32, 256), (1, 8, 32)
    ops_rows: list[list] = []
    bench_linear(args.sizes, Ms, Ts, args.rank, ops_rows)
    for layout in (torch.contiguous_format, torch.channels_last):
        bench_conv(Ms, Ts, args.rank, ops_rows, layout)
    scale_rows: list[list] = []
    bench_scalings(scale_rows)
    os.environ.pop("HALRP_FAST_BACKEND", None)
    print(environment_line("cpu"))
    print(markdown_table(["op", "layer", "M", "tasks", "dense ms", "loop ms", "torch ms", "cpp ms", "loop/cpp",
                          "torch/cpp", "cpp/dense"], ops_rows))
    print("loop = eager formulation in a Python loop over the distinct tasks; torch = the op's pure-PyTorch "
          "provider; cpp = the compiled C++ kernels; dense = the plain layer on the whole batch (the floor)\n")
    print(markdown_table(["fit_scalings", "torch ms", "cpp ms", "torch/cpp"], scale_rows))


if __name__ == "__main__":
    main()
