"""Task-parallel runs: tasks 1..T−1 trained on different processes from one broadcast base.

A task ``t ≥ 1`` depends only on the base, its own data and its seed ``(seed, t)``, so once the base is
trained (rank 0) and broadcast, rank ``r`` trains tasks ``1 + r, 1 + r + W, ...`` (``W`` processes) with
lazy placeholders standing in for the tasks it does not own.  Rank 0 then gathers every task's tensors and
report and replays what the sequential run does after each task: add it, prune all tasks so far (the
all-task bound depends on how many there are), measure, evaluate tasks ``0..t``.  The result equals the
sequential run's (same seeds) up to floating-point reduction order.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..data import TaskData
from . import checkpoint
from .distributed import DistContext, barrier, broadcast_object, gather_objects
from .learner import HALRPLearner, TaskReport
from .runner import CHECKPOINT_DIR, _acc_to_json, build_results, evaluate_row


def _placeholder(t: int) -> Callable[[], dict]:
    def refuse() -> dict:
        raise RuntimeError(f"task {t} is trained by another process; this process holds only a placeholder")

    return refuse


def owned_tasks(num_tasks: int, ctx: DistContext) -> list[int]:
    """Tasks ``≥ 1`` this rank trains (round robin)."""
    return list(range(1 + ctx.rank, num_tasks, ctx.world_size))


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def run_stream_task_parallel(make_learner: Callable[[], HALRPLearner], tasks: Sequence[TaskData], ctx: DistContext,
                             out_dir: str | Path | None = None, log: Callable[[str], None] = print,
                             meta: dict | None = None) -> tuple[HALRPLearner | None, dict | None]:
    """Learn ``tasks`` with the tasks after the base spread over the ranks of ``ctx``.

    Every rank must call this with the same stream and learner factory.  Rank 0 returns the learner and
    the results (also written to ``out_dir/results.json`` with the checkpoint in ``out_dir/checkpoint``);
    the other ranks return ``(None, None)``.
    """
    T = len(tasks)
    if T == 0:
        raise ValueError("the task stream is empty")
    learner = make_learner()
    if learner.base != "learn":
        raise ValueError(f"task-parallel runs learn their base on rank 0; base={learner.base!r} runs sequentially "
                         f"(run_stream) for now")
    tic_wall = time.perf_counter()
    base_state = base_report = None
    if ctx.is_main:
        base_report = learner.train_task(0, tasks[0].train, tasks[0].val, tasks[0].num_classes)
        base_state = _cpu_state(learner.model.task_state_dict(0))
        log(f"task 0 ({tasks[0].name}): base trained in {base_report.seconds['total']:.1f}s, broadcasting")
    base_state = broadcast_object(base_state, ctx)
    tic_tasks = time.perf_counter()
    if not ctx.is_main:
        learner.model.load_state_dict(base_state, strict=False)
        learner.model.freeze_task(0)

    trained: dict[int, tuple[dict, TaskReport]] = {}
    for t in owned_tasks(T, ctx):
        while learner.model.num_tasks < t:
            s = learner.model.num_tasks
            learner.model.add_lazy_task(tasks[s].num_classes, _placeholder(s))
        report = learner.train_task(t, tasks[t].train, tasks[t].val, tasks[t].num_classes)
        trained[t] = (_cpu_state(learner.model.task_state_dict(t)), report)
        log(f"[rank {ctx.rank}] task {t} ({tasks[t].name}) trained in {report.seconds['total']:.1f}s")
    gathered = gather_objects(trained, ctx)
    tasks_seconds = time.perf_counter() - tic_tasks  # training of tasks 1.. on all ranks, up to the gather
    if not ctx.is_main:
        barrier(ctx)
        return None, None

    # rank 0: a fresh learner from the base, then the sequential run's bookkeeping task by task
    final = make_learner()
    final.model.load_state_dict(base_state, strict=False)
    final.model.freeze_task(0)
    final.finish_task(base_report, tasks[0].val)
    parts = {t: v for part in gathered for t, v in part.items()}
    A = np.full((T, T), np.nan)
    evaluate_row(final, tasks, A, base_report, log)
    for t in range(1, T):
        state, report = parts[t]
        final.model.add_task(tasks[t].num_classes)
        final.model.load_task_state(t, state)
        final.model.freeze_task(t)
        final.finish_task(report, tasks[t].val)
        evaluate_row(final, tasks, A, report, log)
    meta = {**(meta or {}), "task_parallel": {"world_size": ctx.world_size,
                                              "wall_seconds": time.perf_counter() - tic_wall,
                                              "base_seconds": base_report.seconds["total"],
                                              "tasks_seconds": tasks_seconds}}
    results = build_results(final, A, tasks, meta)
    if out_dir is not None:
        out = Path(out_dir)
        final.save(out / CHECKPOINT_DIR, extra={"acc_matrix": _acc_to_json(A), "meta": meta})
        checkpoint.atomic_write_json(out / "results.json", results)
    barrier(ctx)
    return final, results
