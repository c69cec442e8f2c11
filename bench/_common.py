"""Shared helpers of the benchmark scripts: timing, environment row, markdown tables."""
from __future__ import annotations

import platform
import statistics
import subprocess
import time

import torch
import torch.utils.benchmark as tb

from halrp_fast.cpu_allocator import add_option as add_allocator_option
from halrp_fast.cpu_allocator import apply_choice, cpu_allocator_state


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment_line(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return (f"device: {device} ({name}), threads: {torch.get_num_threads()}, torch {torch.__version__}, "
            f"git {git_sha()}, cpu allocator {cpu_allocator_state().split(' ')[0]}")


def parse_args(parser, argv=None):
    """``parser.parse_args(argv)`` with ``--cpu-allocator`` added and applied (every baseline of the run shares it)."""
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    apply_choice(args.cpu_allocator)
    return args


def median_ms(fn, device: str = "cpu", min_run_time: float = 0.3) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA: triton.testing.do_bench)."""
    for _ in range(3):  # first calls on a new shape build oneDNN / cuBLAS plans: keep them out of the timing
        fn()
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    # torch.utils.benchmark.Timer runs single-threaded unless told otherwise: use the process's threads, the
    # same as every baseline timed outside it.
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def paired_median_ms(fns, device: str = "cpu", rounds: int = 60) -> list[float]:
    """Median wall time in milliseconds of each of ``fns``, called in turn round after round, so that a slow
    phase of a shared machine (another process, a frequency change) hits every function alike; the order rotates
    every round, so no function always runs right after the same other one (whose data it would find evicted)."""
    for _ in range(3):  # first calls build oneDNN / cuBLAS plans
        for fn in fns:
            fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        turn = [(r + i) % len(fns) for i in range(len(fns))]
        for fn, out in ((fns[i], times[i]) for i in turn):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
