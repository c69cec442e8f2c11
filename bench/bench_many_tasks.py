"""Memory and latency of one TaskModel against the number of tasks it stores (1 → 1000, synthetic tasks).

For each count N, a converted network holds N synthetic tasks (random ``r, s``, rank-``--rank`` ``U, V``,
biases, BatchNorm statistics and heads), then:

* memory: the bytes every task holds (``stored_bytes``) against its parameter count (the paper's growth,
  4 bytes per parameter), and the process's resident memory;
* lazy loading: the checkpoint of the N tasks is opened with ``lazy=True`` (time to open, resident memory
  after opening) and one task's first use is timed (the file read + verification);
* latency per sample: a single-task batch (merged weights, the dense cost) against a mixed batch of the same
  size over 8 distinct tasks drawn from the N stored ones (a new draw each call, so no bank is reused).

    python bench/bench_many_tasks.py                       # LeNet 32×32×3, N ∈ {1, 10, 100, 1000}
    python bench/bench_many_tasks.py --counts 1 10 200 --batch 64 --plot many_tasks.png

The plot (memory and latency against N) goes to ``--plot`` (default bench/many_tasks.png).
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import environment_line, markdown_table, paired_median_ms, parse_args

from halrp_fast import convert, models
from halrp_fast.continual import HALRPConfig, paper_parameter_count, stored_bytes
from halrp_fast.continual.checkpoint import load_into, save_checkpoint
from halrp_fast.continual.config import CHANNELS_LAST_CHOICES


def resident_mib() -> float:
    """The process's resident set size now (Linux ``/proc/self/statm``), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(name: str, n_tasks: int, rank: int, seed: int, device: str, layout=torch.preserve_format):
    """A converted ``name`` network holding ``n_tasks`` synthetic tasks (frozen, eval mode)."""
    g = torch.Generator().manual_seed(seed)
    model = convert(getattr(models, name)(3, 32, 10)).to(device, memory_format=layout)
    for _ in range(n_tasks):
        t = model.add_task(10)
        for L in model.perturbed_layers().values():
            k = min(rank, L.out_features, L.in_features)
            with torch.no_grad():
                L.r[str(t)].copy_(1 + 0.1 * torch.randn(L.out_features, generator=g))
                L.s[str(t)].copy_(1 + 0.1 * torch.randn(L.in_features, generator=g))
            L.set_rank(t, (0.05 * torch.randn(L.out_features, k, generator=g)).to(device),
                       (0.05 * torch.randn(L.in_features, k, generator=g)).to(device))
        model.freeze_task(t)
    return model.eval()


def latencies(model, batch: int, n_tasks: int, device: str, seed: int) -> tuple[float, float]:
    """Per-sample milliseconds of a one-task batch and of a batch over 8 distinct tasks (new draw per call),
    timed alternately (medians over 60 rounds)."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    g = torch.Generator().manual_seed(seed)
    stored = torch.arange(1, n_tasks + 1)
    distinct = min(8, n_tasks)

    def mixed():
        pick = stored[torch.randperm(n_tasks, generator=g)[:distinct]]
        ids = pick[torch.arange(batch) % distinct].to(device)
        return model(x, ids)

    with torch.no_grad():
        single, mix = paired_median_ms([lambda: model(x, n_tasks), mixed], device)
    return single / batch, mix / batch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lenet", choices=["lenet", "alexnet", "resnet18"])
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=str(Path(__file__).with_name("many_tasks.png")))
    ap.add_argument("--channels-last", default="auto", choices=list(CHANNELS_LAST_CHOICES),
                    help="conv weights channels-last (auto: on CPU, as HALRPConfig does)")
    ap.add_argument("--grouped-layout", default="on", choices=["on", "off"],
                    help="mixed image batches in the grouped layout (TaskModel.grouped_mixed_batches) or task group by "
                         "task group")
    args = parse_args(ap, argv)
    layout = HALRPConfig(device=args.device, channels_last=CHANNELS_LAST_CHOICES[args.channels_last]).memory_format(
        has_conv=True)
    on = layout == torch.channels_last
    print(environment_line(args.device))
    print(f"{args.model}, rank {args.rank} per layer, batch {args.batch}, channels-last {on}, grouped layout "
          f"{args.grouped_layout}; mixed batches over 8 distinct tasks")
    rows, series = [], []
    for n in args.counts:
        gc.collect()
        rss0 = resident_mib()
        model = build(args.model, n, args.rank, args.seed, args.device, layout)
        model.grouped_mixed_batches = args.grouped_layout == "on"
        rss_model = resident_mib() - rss0
        held = stored_bytes(model)
        counts = paper_parameter_count(model)
        per_task = sum(held[f"task_{t}"] for t in range(1, n + 1)) / n
        per_task_params = 4 * sum(counts[f"task_{t}"] for t in range(1, n + 1)) / n
        single, mixed = latencies(model, args.batch, n, args.device, args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, model)
            del model
            gc.collect()
            rss1 = resident_mib()
            tic = time.perf_counter()
            lazy = convert(getattr(models, args.model)(3, 32, 10))
            load_into(lazy, tmp, lazy=True)
            lazy = lazy.to(args.device, memory_format=layout).eval()
            open_s = time.perf_counter() - tic
            rss_lazy = resident_mib() - rss1
            tic = time.perf_counter()
            lazy.ensure_loaded([n])
            first_use_ms = (time.perf_counter() - tic) * 1e3
            del lazy
        rows.append([n, held["base"] / 2**20, per_task / 2**10, per_task_params / 2**10, held["total"] / 2**20,
                     rss_model, open_s, rss_lazy, first_use_ms, single * 1e3, mixed * 1e3, mixed / single])
        series.append((n, held["total"] / 2**20, rss_lazy, single * 1e3, mixed * 1e3))
        print(f"  N={n}: {rows[-1][4]:.1f} MiB held, mixed/single {mixed / single:.3f}", flush=True)
    print(markdown_table(["tasks", "base MiB", "per task KiB", "params×4 KiB", "held MiB", "RSS MiB",
                          "lazy open s", "lazy RSS MiB", "first use ms", "single µs/sample", "mixed µs/sample",
                          "mixed / single"], rows))
    plot(series, args)


def plot(series, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, held, lazy_rss, single, mixed = zip(*series, strict=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(n, held, "o-", label="tensors held (all tasks loaded)")
    a.plot(n, lazy_rss, "s--", label="resident after a lazy open")
    a.set(xscale="log", yscale="log", xlabel="stored tasks", ylabel="MiB", title=f"memory ({args.model})")
    a.legend()
    b.plot(n, single, "o-", label="one task (merged weights)")
    b.plot(n, mixed, "s-", label="8 distinct tasks")
    b.set(xscale="log", xlabel="stored tasks", ylabel="µs per sample", title=f"latency, batch {args.batch}")
    b.set_ylim(bottom=0)
    b.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
