"""Task-aware ``nn.Conv2d`` (dense, grouped and depthwise) as a :class:`~halrp_fast.nn.perturbed.PerturbedLayer`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from .._math import conv_out_hw, layout_of, merge_conv_weight, merged_conv_is_cheaper
from ..functional import perturbed_conv2d, perturbed_conv2d_mt
from ._context import TaskContext
from .perturbed import PerturbedLayer


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        # 'same' (stride 1): total padding d·(k−1) per dim, which must split evenly to be a zero pad.
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(p % 2 for p in total):
            raise ValueError(f"padding='same' with kernel {conv.kernel_size} and dilation {conv.dilation} pads "
                             f"asymmetrically, which TaskConv2d does not support; use explicit padding")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)


class TaskConv2d(PerturbedLayer):
    """Task-aware ``nn.Conv2d`` (zero padding): ``x (N, C_in, H, W)`` → ``(N, C_out, H_out, W_out)``.

    The low-rank term ``U Vᵀ`` is the same at every kernel position (the paper's conv form).

    Grouped and depthwise convs (``groups = G > 1``, weight ``(C_out, C_in/G, kh, kw)``) are the block-diagonal
    case of the same math: ``r (C_out,)``, ``s (C_in,)``, ``U (C_out, k)``, ``V (C_in, k)`` as for a dense conv,
    and task ``t``'s weight block ``g`` is ``diag(r_g) W_g diag(s_g) + U_g V_gᵀ`` (the block-diagonal part of
    ``U Vᵀ``: every group has rank ≤ k, at a cost of ``C_out + C_in`` numbers per rank as for a dense layer).  They
    always run through the task's merged weight (a grouped conv's weight is small), with autograd when training.

    ``train_form`` says how a single task's batch is computed when gradients are needed: ``"factored"`` (the op
    ``halrp::perturbed_conv2d``: the base conv of ``s ⊙ x``, its low-rank branch), ``"merged"`` (one conv by
    the merged weight ``r ⊙ W ⊙ s + U Vᵀ``, gradients through it) or ``"auto"`` (the default: merged where
    :func:`halrp_fast._math.merged_conv_is_cheaper` finds it cheaper, i.e. on CPU for wide layers on large
    images).  Both give the same values and gradients up to rounding; inference always uses the merged weight.
    """

    _keeps_grouped_layout = True
    train_form: str = "auto"
    weight_dims = 4

    def __init__(self, weight, bias, stride=1, padding=0, dilation=1, ctx: TaskContext | None = None,
                 groups: int = 1) -> None:
        if weight.dim() != 4:
            raise ValueError(f"weight must have shape (C_out, C_in/groups, kh, kw), got {tuple(weight.shape)}")
        if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
            raise ValueError(f"groups must be a positive int dividing C_out = {weight.shape[0]}, got {groups!r}")
        self.groups = groups  # before the base class sizes the per-task tensors by in_features
        super().__init__(weight, bias, ctx)
        self.stride, self.padding, self.dilation = _checks.conv_geometry(stride, padding, dilation)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ctx: TaskContext | None = None) -> TaskConv2d:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"TaskConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        return cls(conv.weight, conv.bias, conv.stride, _conv_padding(conv), conv.dilation, ctx, conv.groups)

    @property
    def in_features(self) -> int:
        return self._parameters["weight"].shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight.shape[-2:])

    def _plain(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _check_input(self, x):
        shape = x.shape
        if len(shape) != 4 or shape[1] != self.in_features:
            raise self._input_error(x, f"{self.in_features} channels, (N, C, H, W)")

    def _op(self, x, r, s, U, V, bias):
        if self.groups > 1:  # gradients through the merged weight
            return self._plain(x, self._merge(self.weight, r, s, U, V), bias)
        return perturbed_conv2d(x, self.weight, r, s, U, V, bias, self.stride, self.padding, self.dilation,
                                merged=self._trains_merged(x, U.shape[1]))

    def _forward_mixed(self, x, sel):
        if self.groups == 1:
            return super()._forward_mixed(x, sel)
        per_task = self.tensors_of_tasks(sel.tasks)
        if self._can_merge([self.weight] + [p for tensors in per_task for p in tensors]):
            return self._mixed_through_merged(x, sel, per_task)
        pairs = enumerate(zip(sel.tasks, per_task, strict=True))
        return sel.regroup([self._plain(sel.rows(x, i), self.weight, self.bias) if t == 0 else
                            self._op(sel.rows(x, i), *tensors) for i, (t, tensors) in pairs])

    def _trains_merged(self, x: torch.Tensor, k: int) -> bool:
        if self.train_form not in ("auto", "merged", "factored"):
            raise ValueError(f"train_form must be 'auto', 'merged' or 'factored', got {self.train_form!r}")
        if self.train_form != "auto":
            return self.train_form == "merged"
        return merged_conv_is_cheaper(x, self.weight, k, self.stride, self.padding, self.dilation)

    def _op_mt(self, x, local_ids, R, S, U, V, B):
        return perturbed_conv2d_mt(x, local_ids, self.weight, R, S, U, V, B, self.stride, self.padding, self.dilation)

    def _merge(self, weight, r, s, U, V):
        return merge_conv_weight(weight, r, s, U, V, self.groups)

    def _forward_grouped(self, x, sel):
        # Inference: one convolution with groups = G over the task groups' merged weights, stacked along the
        # output channels, so group g's output channels come from group g's input channels only.
        per_task = self.tensors_of_tasks(sel.tasks)
        if not self._can_merge([self.weight] + [p for tensors in per_task for p in tensors]):
            return None
        # The row layout's cost rule: where merging the tasks' weights costs more than the mixed op's low-rank
        # work (deep layers: large weights, small images), the batch goes back to rows for the mixed op.
        rows = torch.empty((sel.grouped.groups * x.shape[0], self.in_features, *x.shape[2:]), device="meta")
        merge_cost, lowrank_cost = self._mixed_costs(rows, len(per_task), max(t[2].shape[1] for t in per_task))
        if merge_cost >= lowrank_cost:
            return None
        weight = torch.cat(self._merged_weights(sel.tasks, per_task))
        bias = None if self.bias is None else torch.cat([tensors[4] for tensors in per_task])
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups=len(per_task) * self.groups)

    def _mixed_costs(self, x, tasks, k):
        if self.groups > 1:
            return 0.0, 1.0  # grouped convs have no mixed op: always their merged weights
        n, n_in, n_out = x.shape[0], self.in_features, self.out_features
        (kh, kw), hw_in = self.kernel_size, x.shape[-2] * x.shape[-1]
        h_out, w_out = conv_out_hw(x, self.weight, self.stride, self.padding, self.dilation)
        hw_out = max(h_out, 0) * max(w_out, 0)
        merged = tasks * n_out * n_in * (kh * kw + k) + n * (hw_in * n_in + hw_out * n_out)
        lowrank = n * (hw_in * n_in * (k + 1) + hw_out * (k * kh * kw + k * n_out + n_out))
        return merged, lowrank

    def to_plain(self, t: int) -> nn.Conv2d:
        b = self.task_tensors(t)[4]
        w = self.weight
        plain = nn.Conv2d(self.in_features, self.out_features, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.groups, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.merged_weight(t))
            if b is not None:
                plain.bias.copy_(b)
        return plain.to(memory_format=layout_of(w))  # the base weight's layout (channels-last stays so)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, tasks={self.num_tasks}")
