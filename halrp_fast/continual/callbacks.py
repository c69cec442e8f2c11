"""What a learner reports while it learns: :class:`Callback` (every hook optional) and :class:`CSVLogger`."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path


class Callback:
    """Hooks a :class:`~halrp_fast.continual.learner.HALRPLearner` calls (``callbacks=[...]``); override any.

    ``phase`` is ``"base"``, ``"free model"`` (the rank estimation's training) or ``"perturbation"``; ``task`` the
    stream's task."""

    def on_task_start(self, task: int, num_classes: int | None) -> None:
        """Before the task's first phase."""

    def on_epoch_end(self, task: int, phase: str, epoch: int, loss: float, seconds: float, samples: int) -> None:
        """After each training epoch (``epoch`` from 0): its mean loss, duration and number of samples."""

    def on_task_end(self, task: int, report) -> None:
        """After the task is finished (pruned, measured): its :class:`~halrp_fast.continual.learner.TaskReport`."""


class CSVLogger(Callback):
    """Writes ``path``: one row per epoch (task, phase, epoch, loss, seconds, samples per second) and one per finished
    task (phase ``"task"``: validation accuracy, total rank, growth, seconds).  The file is rewritten whole after each
    row (to a temporary file renamed over it), so a kill leaves the previous complete file."""

    FIELDS = ("task", "phase", "epoch", "loss", "seconds", "samples_per_s", "val_accuracy", "rank_total", "growth")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []

    def on_epoch_end(self, task, phase, epoch, loss, seconds, samples) -> None:
        self._add({"task": task, "phase": phase, "epoch": epoch + 1, "loss": loss, "seconds": seconds,
                   "samples_per_s": samples / seconds if seconds > 0 else ""})

    def on_task_end(self, task, report) -> None:
        self._add({"task": task, "phase": "task", "seconds": report.seconds.get("total", ""),
                   "val_accuracy": "" if report.val_accuracy is None else report.val_accuracy,
                   "rank_total": sum(report.ranks.values()), "growth": report.growth})

    def _add(self, row: dict) -> None:
        from .checkpoint import atomic_write_bytes

        self.rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.FIELDS, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, text.getvalue().encode())
