"""Per-task BatchNorm: each task has its own affine parameters and running statistics."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._context import TaskContext, TaskModule, TaskSelection


class TaskBatchNorm(TaskModule):
    """Wraps one ``BatchNorm1d``/``BatchNorm2d`` per task (``bns[t]``); task 0's is the original.

    New tasks start as a copy of task 0's module (affine and running statistics).  Modules built with
    ``track_running_stats=False`` normalise with batch statistics in eval mode too, as PyTorch does.
    A mixed batch is normalised per task: with batch statistics (training, or no running statistics)
    each task's rows form their own batch; with running statistics it is one vectorised pass.
    """

    _task_containers = ("bns",)

    def __init__(self, bn: _BatchNorm, ctx: TaskContext | None = None) -> None:
        super().__init__(ctx)
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise TypeError(f"expected an nn.BatchNorm1d or nn.BatchNorm2d, got {type(bn).__name__}")
        self.bns = nn.ModuleList([bn])

    @property
    def num_features(self) -> int:
        return self.bns[0].num_features

    def add_task(self) -> int:
        self.bns.append(copy.deepcopy(self.bns[0]))
        self.num_tasks += 1
        return self.num_tasks - 1

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return list(self.bns[self._check_task(t)].parameters())

    def to_plain(self, t: int) -> _BatchNorm:
        return copy.deepcopy(self.bns[self._check_task(t)])

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        sel = self._selection(task_ids, x)
        if sel.single is not None:
            return self.bns[sel.single](x)
        return self._forward_mixed(x, sel)

    def _forward_mixed(self, x: torch.Tensor, sel: TaskSelection) -> torch.Tensor:
        bns = [self.bns[t] for t in sel.tasks]
        if self.training or not bns[0].track_running_stats:
            return sel.regroup([bn(sel.rows(x, i)) for i, bn in enumerate(bns)])
        # Eval with running statistics: y = x · scale + shift with each task's (C,) scale and shift folded
        # from its statistics and affine parameters, gathered per sample: one pass over x.
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        ids = sel.local_ids
        scale = torch.rsqrt(torch.stack([bn.running_var for bn in bns]) + bns[0].eps)
        shift = -torch.stack([bn.running_mean for bn in bns]) * scale
        if bns[0].affine:
            weight = torch.stack([bn.weight for bn in bns])
            scale, shift = scale * weight, shift * weight + torch.stack([bn.bias for bn in bns])
        return torch.addcmul(shift[ids].view(shape), x, scale[ids].view(shape))

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}"


