"""Public functional API: the ops with Python defaults and normalised conv geometry.

Shapes (``k`` = rank, may be 0; ``T`` = number of tasks in the banks):

* :func:`perturbed_linear` — ``x (..., in)``, ``weight (out, in)``, ``r (out,)``, ``s (in,)``,
  ``U (out, k)``, ``V (in, k)``, ``bias (out,)`` → ``(..., out)``.
* :func:`perturbed_conv2d` — ``x (N, C_in, H, W)``, ``weight (C_out, C_in, kh, kw)``, ``r (C_out,)``,
  ``s (C_in,)``, ``U (C_out, k)``, ``V (C_in, k)``, ``bias (C_out,)`` → ``(N, C_out, H_out, W_out)``.
  ``groups`` is not supported (the perturbation ``U Vᵀ`` is a full C_out × C_in matrix); ``dilation``
  applies to the base conv and to the low-rank window sum alike, so the op equals a conv with the
  merged weight ``r ⊙ W ⊙ s + U Vᵀ`` (same at every kernel position) in every geometry.
* :func:`perturbed_linear_mt` / :func:`perturbed_conv2d_mt` — the same with a task id per row /
  image: ``task_ids (M,)`` int64 and banks ``R (T, out)``, ``S (T, in)``, ``U (T, out, k)``,
  ``V (T, in, k)``, ``B (T, out)``; ranks smaller than ``k`` are zero-padded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks, ops
from ._math import merge_conv_weight


def perturbed_linear(x, weight, r, s, U, V, bias=None) -> torch.Tensor:
    """``r ⊙ ((s ⊙ x) weightᵀ) + (x V) Uᵀ + bias``."""
    return ops.apply(ops.LINEAR, (x, weight, r, s, U, V, bias))


def perturbed_linear_mt(x, task_ids, weight, R, S, U, V, B=None) -> torch.Tensor:
    """Row ``m`` of ``x (M, ..., in)`` equals :func:`perturbed_linear` with task ``task_ids[m]``."""
    return ops.apply(ops.LINEAR_MT, (x, task_ids, weight, R, S, U, V, B))


def perturbed_conv2d(x, weight, r, s, U, V, bias=None, stride=1, padding=0, dilation=1, *,
                     merged: bool = False) -> torch.Tensor:
    """``r ⊙ conv(s ⊙ x, weight) + U · Σ_window(Vᵀ · x) + bias`` (zero padding, groups = 1).

    ``merged=True`` computes the same as one convolution by the merged weight ``r ⊙ W ⊙ s + U Vᵀ``, with the
    gradients of ``r, s, U, V`` through that weight (plain PyTorch autograd): cheaper than the factored op for
    wide layers on large images on CPU (:func:`halrp_fast._math.merged_conv_is_cheaper`, which
    :class:`~halrp_fast.nn.TaskConv2d` consults).
    """
    geo = _checks.conv_geometry(stride, padding, dilation)
    if merged:
        _checks.check_conv(x, weight, r, s, U, V, bias, *geo)
        return F.conv2d(x, merge_conv_weight(weight, r, s, U, V), bias, *geo)
    return ops.apply(ops.CONV2D, (x, weight, r, s, U, V, bias), geo)


def perturbed_conv2d_mt(x, task_ids, weight, R, S, U, V, B=None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Image ``n`` of ``x (N, C_in, H, W)`` equals :func:`perturbed_conv2d` with task ``task_ids[n]``."""
    return ops.apply(ops.CONV2D_MT, (x, task_ids, weight, R, S, U, V, B),
                     _checks.conv_geometry(stride, padding, dilation))
