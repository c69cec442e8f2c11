"""Per-task LayerNorm and GroupNorm: each task has its own affine parameters (as each has its own BatchNorm)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ._context import TaskContext, TaskModule
from .stand_ins import StandIn

#: the normalisations made task-aware by :class:`TaskNorm` (they normalise each sample on its own)
SAMPLE_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
#: class-name endings of the per-sample normalisations that model libraries write themselves (transformers'
#: ``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``T5LayerNorm``, ...): a module of that name holding only its own ``weight``
#: (and ``bias``) normalises over its last dimensions, each sample on its own
_NAMED_SAMPLE_NORMS = ("RMSNorm", "LayerNorm")


def is_sample_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalises each sample on its own with its own affine parameters (LayerNorm, GroupNorm,
    RMSNorm, or a library's RMSNorm / LayerNorm module)."""
    if isinstance(module, SAMPLE_NORMS):
        return True
    return (type(module).__name__.endswith(_NAMED_SAMPLE_NORMS) and not module._modules
            and "weight" in module._parameters and set(module._parameters) <= {"weight", "bias"})


class PerTaskModules(TaskModule):
    """One copy of a module per task in the ``nn.ModuleList`` named by ``_task_containers[0]`` (task 0's is the
    original); a new task's copy is task 0's, trainable even when task 0 is frozen."""

    def _copies(self) -> nn.ModuleList:
        return self._modules[self._task_containers[0]]

    def module_of(self, t: int) -> nn.Module:
        """Task ``t``'s module (``t`` checked by the caller, as a selection's are)."""
        return self._copies()._modules[str(t)]

    #: a single task's forward is its module's: that module stands in
    has_stand_in = stands_in_per_call = True

    def stand_in(self, t: int, constant: bool) -> StandIn:
        return StandIn(self.module_of(t))

    def add_task(self) -> int:
        copies = self._copies()
        module = copy.deepcopy(copies[0])
        module.requires_grad_(True)
        copies.append(module)
        self.num_tasks += 1
        return self.num_tasks - 1

    def remove_last_task(self) -> None:
        del self._copies()[self._check_removable()]
        self.num_tasks -= 1

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return list(self._copies()[self._check_task(t)].parameters())

    def to_plain(self, t: int) -> nn.Module:
        return copy.deepcopy(self._copies()[self._check_task(t)])


class TaskNorm(PerTaskModules):
    """Wraps one ``LayerNorm``/``GroupNorm``/``RMSNorm`` (or a library's RMSNorm, see :func:`is_sample_norm`) per task
    (``norms[t]``); task 0's is the original.

    New tasks start as a copy of task 0's module.  These normalise every sample on its own, so a mixed batch is
    each task group through its own module (its affine parameters; any subclass's forward included), and the
    result equals the single-task forward row by row.
    """

    _task_containers = ("norms",)

    def __init__(self, norm: nn.Module, ctx: TaskContext | None = None) -> None:
        super().__init__(ctx)
        if not is_sample_norm(norm):
            raise TypeError(f"expected an nn.LayerNorm, nn.GroupNorm or an RMSNorm, got {type(norm).__name__}")
        self.norms = nn.ModuleList([norm])

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        sel = self._selection(task_ids, x)
        if sel.single is not None:
            return self.module_of(sel.single)(x)  # the selection checked the id
        if sel.holds_grouped(x):  # task groups side by side along the channels: back to rows, and back again
            return sel.grouped.group(self._forward_rows(sel.grouped.ungroup(x), sel))
        return self._forward_rows(x, sel)

    def _forward_rows(self, x: torch.Tensor, sel) -> torch.Tensor:
        sel.check_rows(x, self.describe(type(self.norms[0]).__name__))
        return sel.regroup([self.module_of(t)(sel.rows(x, i)) for i, t in enumerate(sel.tasks)])

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}"
