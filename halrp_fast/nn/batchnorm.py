"""Per-task BatchNorm: each task has its own affine parameters and running statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._context import TaskContext, TaskSelection
from .norm import PerTaskModules


class TaskBatchNorm(PerTaskModules):
    """Wraps one ``BatchNorm1d``/``BatchNorm2d`` per task (``bns[t]``); task 0's is the original.

    New tasks start as a copy of task 0's module (affine and running statistics).  Modules built with
    ``track_running_stats=False`` normalise with batch statistics in eval mode too, as PyTorch does.
    A mixed batch is normalised per task: with batch statistics (training, or no running statistics)
    each task's rows form their own batch; with running statistics it is one vectorised pass.  A subclass of
    BatchNorm (e.g. BatchNorm with a built-in activation) always runs its own forward per task group.
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

    @property
    def _plain_batchnorm(self) -> bool:
        """Exactly BatchNorm1d/2d: the vectorised mixed-batch forms restate its math, which a subclass may extend."""
        return type(self.bns[0]) in (nn.BatchNorm1d, nn.BatchNorm2d)

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        sel = self._selection(task_ids, x)
        if sel.single is not None:
            return self.module_of(sel.single)(x)  # the selection checked the id
        return self._forward_mixed(x, sel)

    def _forward_grouped(self, x: torch.Tensor, sel: TaskSelection) -> torch.Tensor | None:
        """One BatchNorm over the grouped layout's ``G·C`` channels with the tasks' parameters side by side, or
        ``None`` (running statistics to update, or batch statistics that padding rows would corrupt)."""
        bns = [self.bns[t] for t in sel.tasks]
        first = bns[0]
        if not self._plain_batchnorm:
            return None
        batch_stats = first.training or not first.track_running_stats
        if (first.training and first.track_running_stats) or (batch_stats and sel.grouped.padded):
            return None
        if any(bn.eps != first.eps for bn in bns):
            return None
        mean = var = weight = bias = None
        if not batch_stats:
            mean = torch.cat([bn.running_mean for bn in bns])
            var = torch.cat([bn.running_var for bn in bns])
        if first.affine:
            weight = torch.cat([bn.weight for bn in bns])
            bias = torch.cat([bn.bias for bn in bns])
        return F.batch_norm(x, mean, var, weight, bias, training=batch_stats, eps=first.eps)

    def _forward_mixed(self, x: torch.Tensor, sel: TaskSelection) -> torch.Tensor:
        if sel.holds_grouped(x):
            out = self._forward_grouped(x, sel)
            if out is not None:
                return out
            # Per task group in rows, then back: the layout of the activation is the caller's.
            return sel.grouped.group(self._forward_mixed(sel.grouped.ungroup(x), sel))
        sel.check_rows(x, self.describe(type(self.bns[0]).__name__))
        bns = [self.module_of(t) for t in sel.tasks]
        if self.training or not bns[0].track_running_stats or not self._plain_batchnorm:
            # per task group through the module itself (a subclass may add to BatchNorm, e.g. an activation)
            return sel.regroup([bn(sel.rows(x, i)) for i, bn in enumerate(bns)])
        # Eval with running statistics: y = x · scale + shift with each task's (C,) scale and shift folded
        # from its statistics and affine parameters: one pass over x.
        buffers = [bn._buffers for bn in bns]
        scale = torch.rsqrt(torch.stack([b["running_var"] for b in buffers]) + bns[0].eps)
        shift = -torch.stack([b["running_mean"] for b in buffers]) * scale
        if bns[0].affine:
            params = [bn._parameters for bn in bns]
            weight = torch.stack([p["weight"] for p in params])
            scale, shift = scale * weight, torch.addcmul(torch.stack([p["bias"] for p in params]), shift, weight)
        spatial = (1,) * (x.dim() - 2)
        size = sel.equal_group_size
        if size is not None:  # rows sorted into equal groups: (G, m, C, ...) against (G, 1, C, 1, ...)
            view = (len(bns), 1, x.shape[1], *spatial)
            return torch.addcmul(shift.view(view), x.unflatten(0, (len(bns), size)), scale.view(view)).flatten(0, 1)
        shape = (x.shape[0], x.shape[1], *spatial)
        ids = sel.local_ids
        return torch.addcmul(shift[ids].view(shape), x, scale[ids].view(shape))

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}"


