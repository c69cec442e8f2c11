"""Run a learner over a task stream: accuracy matrix, checkpoints after every task, resume, results."""
from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import metrics
from .._version import __version__
from ..data import TaskData
from . import checkpoint
from .distributed import DistContext, barrier
from .identity import compare, run_identity, task_fingerprint
from .learner import HALRPLearner, TaskReport

CHECKPOINT_DIR = "checkpoint"


def _acc_to_json(A: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in A]


def _acc_from_json(rows, T: int) -> np.ndarray:
    A = np.full((T, T), np.nan)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is not None:
                A[i, j] = v
    return A


def run_stream(make_learner: Callable[[], HALRPLearner], tasks: Sequence[TaskData], out_dir: str | Path | None = None,
               resume: bool = True, progress: bool = False, log: Callable[[str], None] = print,
               meta: dict | None = None, dist: DistContext | None = None,
               allow_changes: Sequence[str] = (), started: float | None = None) -> tuple[HALRPLearner, dict | None]:
    """Learn ``tasks`` in order; after task ``i`` evaluate tasks ``0..i`` (``A[i, j]``).

    With ``out_dir``, the learner is checkpointed to ``out_dir/checkpoint`` after every task and, with
    ``resume``, a run that stopped continues from its last completed task (same result as an uninterrupted
    run on CPU: every task's randomness is seeded from the config seed and the task index).  A checkpoint of
    another run (:func:`~halrp_fast.continual.identity.run_identity`: stream, network, config, ``meta``'s
    benchmark, order, data seed and batch size, library version) is refused with an error naming every
    difference, except the fields in ``allow_changes``; the resumed learner takes the current config.
    Returns the learner and the results dictionary (also written to ``out_dir/results.json``).

    ``dist`` (an active :class:`~halrp_fast.continual.distributed.DistContext`): every process of a ``torchrun``
    launch calls this; each phase runs data parallel, rank 0 writes the checkpoints and results and the
    other ranks return ``(learner, None)``.

    Wall time: every process that worked on the run is a session (its first task, the tasks it finished, its seconds
    from ``started``, a ``time.perf_counter()`` value, by default this call's start, to its last checkpoint);
    ``results["meta"]`` gives their sum as ``wall_seconds``, the sessions and ``resumes`` (their number less one).
    """
    started = time.perf_counter() if started is None else started
    main = dist is None or dist.is_main
    T = len(tasks)
    if T == 0:
        raise ValueError("the task stream is empty")
    A = np.full((T, T), np.nan)
    ckpt = Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None
    fresh = make_learner()
    fingerprints = [task_fingerprint(task) for task in tasks]

    def identity(learned: int) -> dict:
        return run_identity(fresh.config, fingerprints[:learned], getattr(fresh.model.model, "_halrp_spec", None), meta)

    learner = fresh
    if ckpt is not None and resume and (ckpt / checkpoint.MANIFEST).exists():
        try:
            learner, A = _resume(ckpt, fresh, identity, allow_changes, T, dist)
        except checkpoint.CheckpointError as exc:
            exc.start_over = "to start over: run_stream(..., resume=False), or another out_dir"
            raise
        log(f"resuming from {ckpt}: {learner.num_learned} task(s) done")
    learner.dist = dist
    start = learner.num_learned
    earlier = list(learner.manifest.get("sessions", [])) if learner is not fresh else []

    def sessions(done: int) -> list[dict]:
        return earlier + [{"first_task": start, "tasks": done - start, "seconds": time.perf_counter() - started}]

    iterator = range(start, T)
    if progress and main:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="tasks", initial=start, total=T, dynamic_ncols=True)
    for t in iterator:
        task = tasks[t]
        report = learner.learn_task(task.train, task.val, task.num_classes)
        evaluate_row(learner, tasks, A, report, log)
        if ckpt is not None and main:
            learner.save(ckpt, extra={"acc_matrix": _acc_to_json(A[: t + 1, : t + 1]), "meta": meta or {},
                                      "identity": identity(t + 1), "sessions": sessions(t + 1)})
        barrier(dist)
    if not main:
        return learner, None
    results = build_results(learner, A, tasks, meta)
    ran = sessions(T)
    results["meta"] = {**results["meta"], "wall_seconds": sum(s["seconds"] for s in ran), "sessions": ran,
                       "resumes": len(ran) - 1}
    if out_dir is not None:
        checkpoint.atomic_write_json(Path(out_dir) / "results.json", results)
    return learner, results


def _resume(ckpt: Path, fresh: HALRPLearner, identity: Callable[[int], dict], allow_changes: Sequence[str], T: int,
            dist: DistContext | None) -> tuple[HALRPLearner, np.ndarray]:
    """The learner and accuracy matrix of the checkpoint ``ckpt``, once its run is known to be this one."""
    manifest = checkpoint.read_manifest(ckpt)
    learned = len(manifest["num_classes"]) - (1 if manifest.get("base") == "given" else 0)  # tasks of the stream
    if learned > T:
        raise checkpoint.CheckpointError(f"{ckpt} holds {learned} tasks, the stream has {T}")
    stored = manifest.get("identity")
    if stored is None:
        raise checkpoint.CheckpointError(f"{ckpt} records no run identity (written by an older version)")
    compare(stored, identity(learned), allow_changes, str(ckpt))
    if manifest.get("base", "learn") != fresh.base:
        raise checkpoint.CheckpointError(f"{ckpt} holds a run with base={manifest.get('base', 'learn')!r}, this run "
                                         f"has base={fresh.base!r}")
    learner = HALRPLearner.load(ckpt, device=dist.device if dist is not None else fresh.config.device,
                                model=None if manifest.get("model_spec") else fresh.model)
    learner.config = dataclasses.replace(fresh.config, device=learner.config.device)
    return learner, _acc_from_json(learner.manifest.get("acc_matrix", []), T)


def evaluate_row(learner: HALRPLearner, tasks: Sequence[TaskData], A: np.ndarray, report: TaskReport,
                 log: Callable[[str], None]) -> None:
    """Fill row ``t = report.task`` of the accuracy matrix (tasks ``0..t`` on their test data) and log it."""
    t = report.task
    tic = time.perf_counter()
    for j in range(t + 1):
        A[t, j] = learner.evaluate(tasks[j].test, j)
    report.seconds["evaluation"] = time.perf_counter() - tic
    log(f"task {t} ({tasks[t].name}): test acc {A[t, t]:.2f}%, ranks {sum(report.ranks.values())} total, "
        f"growth {100 * report.growth:.1f}%, {report.seconds['total']:.1f}s")


def build_results(learner: HALRPLearner, A: np.ndarray, tasks: Sequence[TaskData], meta: dict | None) -> dict:
    from .accounting import paper_parameter_count, stored_bytes

    counts = paper_parameter_count(learner.model)
    nbytes = stored_bytes(learner.model)
    summary = metrics.summary(A)
    return {
        "acc_matrix": _acc_to_json(A),
        "ACC": summary["ACC"],
        "BWT": summary["BWT"],
        "forgetting": summary["forgetting"],
        "final_accuracy": summary["final"],
        "growth": counts["total"] / counts["base"] - 1,
        "params": counts,
        "bytes": nbytes,
        "ranks": {str(r.task): r.ranks for r in learner.reports},
        "seconds": {str(r.task): r.seconds for r in learner.reports},
        "tasks": [t.name for t in tasks],
        "reports": [dataclasses.asdict(r) for r in learner.reports],
        "config": learner.config.to_dict(),
        "base": learner.base,
        "meta": meta or {},
        "versions": {"halrp_fast": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
