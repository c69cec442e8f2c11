"""Per-task LayerNorm and GroupNorm: each task has its own affine parameters (as each has its own BatchNorm)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ._context import TaskContext, TaskModule

#: the normalisations made task-aware by :class:`TaskNorm` (they normalise each sample on its own)
SAMPLE_NORMS = (nn.LayerNorm, nn.GroupNorm)


class TaskNorm(TaskModule):
    """Wraps one ``LayerNorm``/``GroupNorm`` per task (``norms[t]``); task 0's is the original.

    New tasks start as a copy of task 0's module.  These normalise every sample on its own, so a mixed batch is
    each task group through its own module (its affine parameters; any subclass's forward included), and the
    result equals the single-task forward row by row.
    """

    _task_containers = ("norms",)

    def __init__(self, norm: nn.Module, ctx: TaskContext | None = None) -> None:
        super().__init__(ctx)
        if not isinstance(norm, SAMPLE_NORMS):
            raise TypeError(f"expected an nn.LayerNorm or nn.GroupNorm, got {type(norm).__name__}")
        self.norms = nn.ModuleList([norm])

    def add_task(self) -> int:
        """A new task's module: a copy of task 0's, trainable even when task 0 is frozen."""
        norm = copy.deepcopy(self.norms[0])
        norm.requires_grad_(True)
        self.norms.append(norm)
        self.num_tasks += 1
        return self.num_tasks - 1

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return list(self.norms[self._check_task(t)].parameters())

    def to_plain(self, t: int) -> nn.Module:
        return copy.deepcopy(self.norms[self._check_task(t)])

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        sel = self._selection(task_ids, x)
        if sel.single is not None:
            return self.norms._modules[str(sel.single)](x)  # the selection checked the id
        if sel.holds_grouped(x):  # task groups side by side along the channels: back to rows, and back again
            return sel.grouped.group(self._forward_rows(sel.grouped.ungroup(x), sel))
        return self._forward_rows(x, sel)

    def _forward_rows(self, x: torch.Tensor, sel) -> torch.Tensor:
        norms = [self.norms._modules[str(t)] for t in sel.tasks]
        return sel.regroup([norm(sel.rows(x, i)) for i, norm in enumerate(norms)])

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}"
