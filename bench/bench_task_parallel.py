"""Scaling of ``--task-parallel``: wall time of tasks 1..T−1 against the number of processes.

Each process gets the same compute (``--threads-per-rank`` threads, default 1), so a perfect scaling divides
the time of the tasks after the base by the number of processes.  The base (task 0) is trained on rank 0 alone
and broadcast, and rank 0 replays pruning and evaluation after the gather; both are reported separately
(``base s``, ``wall s``) and are not part of the scaled phase (``tasks s``: from the broadcast of the base to
the gather of every task's tensors, measured on rank 0).

    python bench/bench_task_parallel.py                                  # pfmnist, 1 and 2 processes
    python bench/bench_task_parallel.py --procs 1 2 4 8 --threads-per-rank 2 --benchmark pfmnist --tasks 9

Every run is launched with ``python -m torch.distributed.run --standalone`` (gloo on CPU, NCCL on GPU) and
must give the same model: the final accuracies of every run are compared with the 1-process run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import environment_line, markdown_table


def launch(procs: int, args, out: Path) -> dict:
    """One ``halrp-fast run --task-parallel`` on ``procs`` processes; its results.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "halrp_fast.cli", "run", "--benchmark", args.benchmark, "--tasks", str(args.tasks),
           "--max-per-task", str(args.max_per_task), "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--no-progress", "--quiet", "--task-parallel", "--out", str(out)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_rank))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{procs} processes failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((out / "results.json").read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (the first is the "
                    "reference)")
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--benchmark", default="pfmnist")
    ap.add_argument("--tasks", type=int, default=5, help="tasks of the stream, the base included")
    ap.add_argument("--max-per-task", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    if args.tasks < 2:
        ap.error("--tasks must be ≥ 2 (the base and at least one task to spread)")
    print(environment_line("cpu"))
    print(f"{args.benchmark}: {args.tasks} tasks, {args.max_per_task} samples per task, {args.epochs} epochs, "
          f"{args.threads_per_rank} thread(s) per process, {os.cpu_count()} CPUs")
    rows, reference = [], None
    for procs in args.procs:
        with tempfile.TemporaryDirectory() as tmp:
            res = launch(procs, args, Path(tmp))
        tp = res["meta"]["task_parallel"]
        acc = res["final_accuracy"]
        if reference is None:
            reference = (tp["tasks_seconds"], acc, procs)
        speedup = reference[0] / tp["tasks_seconds"]
        same = max(abs(a - b) for a, b in zip(acc, reference[1], strict=True))
        rows.append([procs, tp["base_seconds"], tp["tasks_seconds"], tp["wall_seconds"], speedup,
                     speedup / (procs / reference[2]), res["ACC"], same])
        print(f"  {procs} processes: tasks {tp['tasks_seconds']:.1f} s, speed-up {speedup:.2f}", flush=True)
    print(markdown_table(["processes", "base s", "tasks s", "wall s", "tasks speed-up", "efficiency",
                          "ACC %", "max |Δacc| vs first"], rows))


if __name__ == "__main__":
    main()
