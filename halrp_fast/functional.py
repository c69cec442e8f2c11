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

from . import _checks, ops


def _traced(op, args: tuple, geo: tuple = ()) -> torch.Tensor:
    """Under torch.compile: the registered op (no graph break), saving intermediates when a backward follows."""
    return op(*args, ops.needs_grad(args), *geo)[0]


def perturbed_linear(x, weight, r, s, U, V, bias=None) -> torch.Tensor:
    """``r ⊙ ((s ⊙ x) weightᵀ) + (x V) Uᵀ + bias``."""
    _checks.check_tensors(("bias",), x=x, weight=weight, r=r, s=s, U=U, V=V, bias=bias)
    if torch.compiler.is_compiling():
        return _traced(ops.perturbed_linear, (x, weight, r, s, U, V, bias))
    return ops.eager_apply("perturbed_linear", (x, weight, r, s, U, V, bias))


def perturbed_linear_mt(x, task_ids, weight, R, S, U, V, B=None) -> torch.Tensor:
    """Row ``m`` of ``x (M, ..., in)`` equals :func:`perturbed_linear` with task ``task_ids[m]``."""
    _checks.check_tensors(("B",), x=x, task_ids=task_ids, weight=weight, R=R, S=S, U=U, V=V, B=B)
    if torch.compiler.is_compiling():
        return _traced(ops.perturbed_linear_mt, (x, task_ids, weight, R, S, U, V, B))
    return ops.eager_apply("perturbed_linear_mt", (x, task_ids, weight, R, S, U, V, B))


def perturbed_conv2d(x, weight, r, s, U, V, bias=None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """``r ⊙ conv(s ⊙ x, weight) + U · Σ_window(Vᵀ · x) + bias`` (zero padding, groups = 1)."""
    _checks.check_tensors(("bias",), x=x, weight=weight, r=r, s=s, U=U, V=V, bias=bias)
    geo = _checks.conv_geometry(stride, padding, dilation)
    if torch.compiler.is_compiling():
        return _traced(ops.perturbed_conv2d, (x, weight, r, s, U, V, bias), geo)
    return ops.eager_apply("perturbed_conv2d", (x, weight, r, s, U, V, bias), geo)


def perturbed_conv2d_mt(x, task_ids, weight, R, S, U, V, B=None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Image ``n`` of ``x (N, C_in, H, W)`` equals :func:`perturbed_conv2d` with task ``task_ids[n]``."""
    _checks.check_tensors(("B",), x=x, task_ids=task_ids, weight=weight, R=R, S=S, U=U, V=V, B=B)
    geo = _checks.conv_geometry(stride, padding, dilation)
    if torch.compiler.is_compiling():
        return _traced(ops.perturbed_conv2d_mt, (x, task_ids, weight, R, S, U, V, B), geo)
    return ops.eager_apply("perturbed_conv2d_mt", (x, task_ids, weight, R, S, U, V, B), geo)
