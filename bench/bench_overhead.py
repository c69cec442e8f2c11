"""Per-call overhead of the ops at serving sizes, against the plain PyTorch formula and the dense layer.

At 256×256 and rank 8 the arithmetic is a few microseconds, so what these rows measure is everything around
it: argument checks, provider choice, autograd bookkeeping, dispatch.  Baselines, timed in the same rounds:

* the plain formula ``r * F.linear(x * s, W) + (x @ V) @ U.T + b`` (what the op replaces);
* the dense layer ``F.linear(x, W, b)`` (the floor of a mixed-task batch);
* the plain LeNet against the converted one serving a single image of a later task.

``python bench/bench_overhead.py [--threads 1] [--rounds 400]`` prints a markdown table of medians in µs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_line, markdown_table, paired_median_ms, parse_args  # noqa: E402

import halrp_fast as hf  # noqa: E402
from halrp_fast.models import lenet  # noqa: E402

OUT, IN, RANK, TASKS = 256, 256, 8, 8


def _layer(grad: bool, gen: torch.Generator):
    def p(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(grad)

    W = torch.randn(OUT, IN, generator=gen) / IN**0.5  # the frozen base
    return W, p(OUT, scale=0.1).add(1).detach().requires_grad_(grad), \
        p(IN, scale=0.1).add(1).detach().requires_grad_(grad), p(OUT, RANK, scale=0.1), p(IN, RANK, scale=0.1), p(OUT)


def single_task_rows(rows: int, mode: str, rounds: int, gen: torch.Generator) -> list:
    """``mode``: "no grad" (inference), "grad" (forward building the graph), "fwd+bwd"."""
    grad = mode != "no grad"
    W, r, s, U, V, b = _layer(grad, gen)
    x = torch.randn(rows, IN, generator=gen)

    def formula():
        return r * F.linear(x * s, W) + (x @ V) @ U.T + b

    def library():
        return hf.functional.perturbed_linear(x, W, r, s, U, V, b)

    if mode == "fwd+bwd":
        fns = [lambda f=f: f().sum().backward() for f in (formula, library)]
    else:
        fns = [formula, library]
    with torch.set_grad_enabled(grad):
        t_formula, t_lib = paired_median_ms(fns, rounds=rounds)
    return [f"perturbed_linear, {rows} row(s), {mode}", "formula", t_formula * 1e3, t_lib * 1e3, t_lib / t_formula,
            "≤ 1.1"]


def mixed_rows(rounds: int, gen: torch.Generator) -> list:
    W = torch.randn(OUT, IN, generator=gen) / IN**0.5
    R, S = 1 + 0.1 * torch.randn(TASKS, OUT, generator=gen), 1 + 0.1 * torch.randn(TASKS, IN, generator=gen)
    U, V = 0.1 * torch.randn(TASKS, OUT, RANK, generator=gen), 0.1 * torch.randn(TASKS, IN, RANK, generator=gen)
    B, b = torch.randn(TASKS, OUT, generator=gen), torch.randn(OUT, generator=gen)
    x = torch.randn(TASKS, IN, generator=gen)
    ids = torch.arange(TASKS)
    with torch.no_grad():
        t_dense, t_lib = paired_median_ms([lambda: F.linear(x, W, b),
                                           lambda: hf.functional.perturbed_linear_mt(x, ids, W, R, S, U, V, B)],
                                          rounds=rounds)
    return [f"perturbed_linear_mt, {TASKS} rows of {TASKS} tasks, no grad", "dense layer", t_dense * 1e3,
            t_lib * 1e3, t_lib / t_dense, "≤ 2"]


def lenet_rows(rounds: int, gen: torch.Generator) -> list:
    torch.manual_seed(0)
    plain = lenet().eval()
    model = hf.convert(plain).eval()  # a converted copy: the same base weights
    t = model.add_task(10)
    for layer in model.perturbed_layers().values():
        with torch.no_grad():
            layer.r[str(t)].add_(0.01 * torch.randn(layer.out_features, generator=gen))
        layer.set_rank(t, 0.1 * torch.randn(layer.out_features, RANK, generator=gen),
                       0.1 * torch.randn(layer.in_features, RANK, generator=gen))
    x = torch.randn(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        t_plain, t_conv = paired_median_ms([lambda: plain(x), lambda: model(x, t)], rounds=rounds)
    return ["converted LeNet, 1 image of task 1, eval", "plain LeNet", t_plain * 1e3, t_conv * 1e3,
            t_conv / t_plain, "≤ 1.1"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=400)
    args = parse_args(parser, argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = [single_task_rows(m, mode, args.rounds, gen) for m in (1, 32) for mode in ("no grad", "grad", "fwd+bwd")]
    rows.append(mixed_rows(args.rounds, gen))
    rows.append(lenet_rows(args.rounds, gen))
    print(environment_line("cpu") + f", ops via: {hf._backend.select('perturbed_linear', 'cpu', 'float32')[0]} "
          f"(single), {hf._backend.select('perturbed_linear_mt', 'cpu', 'float32')[0]} (mixed); "
          f"{OUT}×{IN}, rank {RANK}, medians of {args.rounds} paired rounds")
    print(markdown_table(["call", "baseline", "baseline µs", "library µs", "ratio", "target"], rows))


if __name__ == "__main__":
    main()
