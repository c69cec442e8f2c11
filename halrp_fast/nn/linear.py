r"""Task-aware linear layers: ``nn.Linear`` and transformers' ``Conv1D`` (a linear layer storing its weight
transposed) as :class:`~halrp_fast.nn.perturbed.PerturbedLayer`\ s."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._math import merge_linear_weight
from ..functional import perturbed_linear, perturbed_linear_mt
from ._context import TaskContext
from .perturbed import PerturbedLayer


class TaskLinear(PerturbedLayer):
    """Task-aware ``nn.Linear``: ``x (..., in)`` → ``(..., out)``; mixed batches take ``x (M, ..., in)``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, ctx: TaskContext | None = None) -> TaskLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, ctx)

    def _plain(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _check_input(self, x):
        shape = x.shape
        if not shape or shape[-1] != self.in_features:
            raise self._input_error(x, f"{self.in_features} features in the last dimension")

    def _op(self, x, r, s, U, V, bias):
        return perturbed_linear(x, self.weight, r, s, U, V, bias)

    def _op_mt(self, x, local_ids, R, S, U, V, B):
        return perturbed_linear_mt(x, local_ids, self.weight, R, S, U, V, B)

    def _merge(self, weight, r, s, U, V):
        return merge_linear_weight(weight, r, s, U, V)

    def _mixed_costs(self, x, tasks, k):
        rows, n_in, n_out = x.numel() // self.in_features, self.in_features, self.out_features
        merged = tasks * n_out * n_in * (1 + k) + rows * (n_in + n_out)
        return merged, rows * (k + 1) * (n_in + n_out)

    def to_plain(self, t: int) -> nn.Linear:
        b = self.task_tensors(t)[4]
        w = self.weight
        plain = nn.Linear(self.in_features, self.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.merged_weight(t))
            if b is not None:
                plain.bias.copy_(b)
        return plain


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): a linear layer storing its weight as ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), nn.Parameter)


class TaskConv1D(TaskLinear):
    """Task-aware transformers ``Conv1D`` (``y = x W + b`` with ``W (in, out)``): a :class:`TaskLinear` whose
    ``weight (out, in)`` is the transposed view of the original parameter, so task 0 runs the original's exact
    ``addmm`` and :meth:`to_plain` gives back a ``Conv1D``."""

    plain_transposed = True

    @classmethod
    def from_conv1d(cls, conv: nn.Module, ctx: TaskContext | None = None) -> TaskConv1D:
        if not is_conv1d(conv):
            raise TypeError(f"expected a transformers Conv1D, got {type(conv).__name__}")
        layer = cls(conv.weight.detach().T, conv.bias, ctx)
        layer.weight.requires_grad_(conv.weight.requires_grad)
        layer.plain_type = type(conv)
        return layer

    def _plain(self, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        out = torch.mm(rows, weight.T) if bias is None else torch.addmm(bias, rows, weight.T)
        return out.view(*x.shape[:-1], weight.shape[0])

    def to_plain(self, t: int) -> nn.Module:
        weight, bias = self.task_weight(t)
        plain = self.plain_type(self.out_features, self.in_features).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(weight.T)
            if bias is None:
                plain.bias = None
            else:
                plain.bias.copy_(bias)
        return plain
