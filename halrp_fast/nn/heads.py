"""One classifier per task, each with its own number of classes."""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ._context import TaskContext, TaskModule
from .stand_ins import StandIn


class TaskHeads(TaskModule):
    """``heads[t]`` classifies task ``t``; ``heads[0]`` is the model's original head.

    New heads come from ``head_factory(num_classes)``; by default an ``nn.Linear`` with the original
    head's input size, bias setting, dtype and device.  For a single task the output is
    ``(M, C_t)``; a mixed batch returns ``(M, max C_t)`` where the columns past a row's own class
    count are ``-inf`` (so ``argmax`` and ``cross_entropy`` on the row's own labels are unaffected).  A head whose
    classes are channels (a conv classifier, output ``(M, C_t, ...)``) is padded along dim 1 instead.
    """

    _task_containers = ("heads",)

    def __init__(self, head: nn.Module, ctx: TaskContext | None = None,
                 head_factory: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__(ctx)
        if head_factory is None and not isinstance(head, nn.Linear):
            raise TypeError(f"the head must be an nn.Linear (got {type(head).__name__}); for another kind of "
                            f"head pass head_factory=lambda num_classes: <new head module>")
        self.heads = nn.ModuleList([head])
        self._factory = head_factory
        classes, self._class_dim = self._classes_of(head)
        self.num_classes: list[int] = [classes]

    @staticmethod
    def _classes_of(head: nn.Module) -> tuple[int, int]:
        """``(number of classes, the output dimension holding them)``: the head's ``out_features``, else those of
        its last linear layer (classes along the last dim) or the channels of its last conv (classes along dim 1,
        e.g. a 1×1 conv classifier followed by pooling)."""
        n = getattr(head, "out_features", None)
        if n is not None:
            return int(n), -1
        found = None
        for m in head.modules():
            if isinstance(m, nn.Linear):
                found = (m.out_features, -1)
            elif isinstance(m, nn.modules.conv._ConvNd):
                found = (m.out_channels, 1)
        if found is None:
            raise TypeError(f"cannot tell the number of classes of head {type(head).__name__}: give it an "
                            f"'out_features' attribute")
        return found

    def add_task(self, num_classes: int) -> int:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if self._factory is not None:
            head = self._factory(num_classes)
        else:
            base = self.heads[0]
            head = nn.Linear(base.in_features, num_classes, bias=base.bias is not None,
                             device=base.weight.device, dtype=base.weight.dtype)
        self.heads.append(head)
        self.num_classes.append(num_classes)
        self.num_tasks += 1
        return self.num_tasks - 1

    def remove_last_task(self) -> None:
        del self.heads[self._check_removable()]
        self.num_classes.pop()
        self.num_tasks -= 1

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return list(self.heads[self._check_task(t)].parameters())

    #: a single task's forward is its head's: that head stands in
    has_stand_in = stands_in_per_call = True

    def stand_in(self, t: int, constant: bool) -> StandIn:
        return StandIn(self.heads._modules[str(t)])

    def to_plain(self, t: int) -> nn.Module:
        return copy.deepcopy(self.heads[self._check_task(t)])

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        sel = self._selection(task_ids, x)
        if sel.single is not None:
            return self.heads._modules[str(sel.single)](x)  # the selection checked the id
        x = sel.as_rows(x)
        sel.check_rows(x, self.describe("the head"))
        same = self._same_linear_heads(sel.tasks)
        size = sel.equal_group_size
        if same is not None and size is not None and x.dim() == 2:
            # Rows sorted into equal task groups: one batched product (G, m, F) × (G, F, C).
            weight, bias = same
            groups = x.unflatten(0, (len(sel.tasks), size))
            out = torch.bmm(groups, weight.transpose(1, 2)) if bias is None else \
                torch.baddbmm(bias.unsqueeze(1), groups, weight.transpose(1, 2))
            return out.flatten(0, 1)
        width = max(self.num_classes[t] for t in sel.tasks)
        parts = []
        for i, t in enumerate(sel.tasks):
            logits = self.heads[t](sel.rows(x, i))
            dim = self._class_dim % logits.dim()
            if logits.shape[dim] < width:  # -inf past the task's own classes, along the class dimension
                shape = list(logits.shape)
                shape[dim] = width - logits.shape[dim]
                logits = torch.cat([logits, logits.new_full(shape, float("-inf"))], dim=dim)
            parts.append(logits)
        return sel.regroup(parts)

    def _same_linear_heads(self, tasks: list[int]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Stacked ``(weight (G, C, F), bias (G, C) or None)`` when the heads of ``tasks`` are plain ``nn.Linear``
        layers of one shape (and all with or all without bias), else ``None``."""
        heads = [self.heads._modules[str(t)] for t in tasks]
        if any(type(h) is not nn.Linear for h in heads):
            return None
        params = [h._parameters for h in heads]
        shape, no_bias = params[0]["weight"].shape, params[0]["bias"] is None
        if any(p["weight"].shape != shape or (p["bias"] is None) != no_bias for p in params):
            return None
        weight = torch.stack([p["weight"] for p in params])
        return weight, None if no_bias else torch.stack([p["bias"] for p in params])

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
