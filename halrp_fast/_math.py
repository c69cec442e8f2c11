"""Math shared by the providers, the kernels' launchers and the task-aware modules.

Notation (one layer, one task): ``W`` the frozen base weight, ``r`` the output scale, ``s`` the input scale,
``U (out, k)``, ``V (in, k)`` the low-rank perturbation.  A conv's low-rank weight is the same at every kernel
position, so its branch is a 1×1 conv by ``Vᵀ``, a sum over the kernel window (same stride, padding and
dilation as the conv) and a 1×1 conv by ``U``.

Nothing here chooses a provider or reads a global setting: every function is determined by its arguments.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

Pair = Sequence[int]


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------
def layout_of(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D tensor stored that way (and not also plainly contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout ``F.conv2d(x, weight)`` returns: channels_last when the input or the weight is."""
    if torch.channels_last in (layout_of(x), layout_of(weight)):
        return torch.channels_last
    return torch.contiguous_format


def in_layout(t: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``t`` in ``layout`` (4-D tensors; other ranks as they are); no copy when it already is."""
    return t.contiguous(memory_format=layout) if t.dim() == 4 else t


# --------------------------------------------------------------------------------------------
# saved tensors and placeholders
# --------------------------------------------------------------------------------------------
def none_like(x: torch.Tensor) -> torch.Tensor:
    """Placeholder ``(0,)`` for a gradient that is not needed, or a tensor that was not saved."""
    return x.new_empty(0)


def is_saved(t: torch.Tensor, shape) -> bool:
    """A forward's saved tensor has its full shape; the placeholder for 'not saved' has shape (0,)."""
    return tuple(t.shape) == tuple(shape)


# --------------------------------------------------------------------------------------------
# task grouping
# --------------------------------------------------------------------------------------------
def task_groups(task_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(task, row_indices), ...]`` for the distinct tasks of ``task_ids (M,)``, in ascending task order."""
    if task_ids.numel() == 0:
        return []
    uniq, counts = torch.unique(task_ids, return_counts=True)
    order = torch.argsort(task_ids, stable=True)
    return list(zip(uniq.tolist(), torch.split(order, counts.tolist()), strict=True))


def row_task_ids(task_ids: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """The task of every row when each of the ``M`` samples spans ``rows_per_sample`` rows: ``(M·L,)``."""
    return task_ids if rows_per_sample == 1 else task_ids.repeat_interleave(rows_per_sample)


def rows_of(x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, ..., in)`` flattened to rows ``(M·L, in)`` and the task of each row."""
    rows = x.reshape(-1, x.shape[-1])
    return rows, row_task_ids(task_ids, rows.shape[0] // max(x.shape[0], 1))


def rows_by_task(task_ids: torch.Tensor, rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ordered by task: ``(rows, tasks)`` with ``rows[p]`` the row at position ``p`` and ``tasks[p]`` its task,
    ascending (stable), so that consecutive positions hold few distinct tasks."""
    ids = row_task_ids(task_ids, rows_per_sample)
    rows = torch.argsort(ids, stable=True)
    return rows, ids.index_select(0, rows)


# --------------------------------------------------------------------------------------------
# merged weights
# --------------------------------------------------------------------------------------------
def merge_linear_weight(weight, r, s, U, V) -> torch.Tensor:
    """``diag(r) W diag(s) + U Vᵀ``: ``(out, in)``; for banks ``r (T, out)``, ``s (T, in)``, ``U (T, out, k)``,
    ``V (T, in, k)`` the ``T`` merged weights ``(T, out, in)``."""
    scaled = r[..., :, None] * weight * s[..., None, :]
    return torch.addmm(scaled, U, V.T) if r.dim() == 1 else torch.baddbmm(scaled, U, V.mT)


def merge_conv_weight(weight, r, s, U, V, groups: int = 1) -> torch.Tensor:
    """``r ⊙ W ⊙ s + (U Vᵀ)`` at every kernel position: ``(C_out, C_in, kh, kw)``; for banks (as
    :func:`merge_linear_weight`) the ``T`` merged weights ``(T, C_out, C_in, kh, kw)``.

    ``groups = G > 1``: ``W (C_out, C_in/G, kh, kw)`` is the grouped conv's weight, i.e. the diagonal blocks of a
    block-diagonal ``(C_out, C_in)`` weight; the merged weight keeps that form, block ``g`` being
    ``diag(r_g) W_g diag(s_g) + U_g V_gᵀ`` (``U_g``: the rows of ``U`` of group ``g``'s output channels, ``V_g``:
    those of ``V`` of its input channels), i.e. the block-diagonal part of ``U Vᵀ``."""
    if groups == 1:
        return r[..., :, None, None, None] * weight * s[..., None, :, None, None] + (U @ V.mT)[..., None, None]
    c_out, c_in_g = weight.shape[:2]
    lead, k = U.shape[:-2], U.shape[-1]
    blocks = U.reshape(*lead, groups, c_out // groups, k) @ V.reshape(*lead, groups, c_in_g, k).mT
    s_rows = s.reshape(*lead, groups, 1, c_in_g).expand(*lead, groups, c_out // groups, c_in_g)
    lowrank, s_rows = blocks.reshape(*lead, c_out, c_in_g), s_rows.reshape(*lead, c_out, c_in_g)
    return r[..., :, None, None, None] * weight * s_rows[..., None, None] + lowrank[..., None, None]


# --------------------------------------------------------------------------------------------
# the conv's low-rank branch
# --------------------------------------------------------------------------------------------
def per_channel(v: torch.Tensor) -> torch.Tensor:
    """``(C,)`` → ``(C, 1, 1)``, or ``(N, C)`` → ``(N, C, 1, 1)``: broadcast over H, W."""
    return v[..., None, None]


def conv1x1(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Channel mix ``(N, c, H, W) → (N, d, H, W)`` by ``M (d, c)``."""
    return F.conv2d(x, M[:, :, None, None])


def window_sum(z: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> torch.Tensor:
    """Sum of ``z (N, k, H, W)`` over every conv window: ``(N, k, H_out, W_out)``."""
    kh, kw = kernel
    if tuple(dilation) == (1, 1) and padding[0] <= kh // 2 and padding[1] <= kw // 2:
        # avg-pool with divisor 1 is a sum-pool and much faster than a depthwise conv.
        return F.avg_pool2d(z, (kh, kw), stride, padding, count_include_pad=True, divisor_override=1)
    ones = z.new_ones(z.shape[1], 1, kh, kw)
    return F.conv2d(z, ones, None, stride, padding, dilation, groups=z.shape[1])


def window_sum_adjoint(g: torch.Tensor, in_hw: Pair, kernel: Pair, stride: Pair, padding: Pair,
                       dilation: Pair) -> torch.Tensor:
    """Adjoint of :func:`window_sum`: ``g (N, k, H_out, W_out)`` → ``(N, k, H, W)``."""
    k = g.shape[1]
    ones = g.new_ones(k, 1, *kernel)
    return conv2d_input((g.shape[0], k, *in_hw), ones, g, stride, padding, dilation, groups=k)


def lowrank_pool(x, V, kernel, stride, padding, dilation) -> torch.Tensor:
    """``Σ_window(Vᵀ · x)``: ``(N, k, H_out, W_out)``; the window sum commutes with the channel mix, so it
    runs on whichever side has fewer channels (k or C_in)."""
    if V.shape[1] <= x.shape[1]:
        return window_sum(conv1x1(x, V.T), kernel, stride, padding, dilation)
    return conv1x1(window_sum(x, kernel, stride, padding, dilation), V.T)


def conv_out_hw(x: torch.Tensor, weight: torch.Tensor, stride: Pair, padding: Pair, dilation: Pair) -> tuple[int, int]:
    """``(H_out, W_out)`` of ``conv(x, weight)`` (may be < 1 for an input smaller than the kernel)."""
    H, W = x.shape[-2], x.shape[-1]
    kh, kw = weight.shape[-2], weight.shape[-1]
    ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


# --------------------------------------------------------------------------------------------
# merged or factored: the cost rule a single-task conv layer trains by
# --------------------------------------------------------------------------------------------
# Cost of one elementwise pass over one activation element (read + write), in multiply-adds of a CPU
# convolution, and the passes the factored form makes over the input and output activations (scalings, the
# r-product, bias, the saved product, ds / dr reductions).  Measured on a 2-core x86 machine: oneDNN convs run
# at ≈ 150 GFLOP/s and an elementwise pass costs ≈ 1 ns per element.
_PASS_MACS = 60
_FACTORED_PASSES = 10


def merged_conv_is_cheaper(x: torch.Tensor, weight: torch.Tensor, k: int, stride: Pair, padding: Pair,
                           dilation: Pair) -> bool:
    """Whether a single-task conv trains faster through its merged weight ``W_t = r ⊙ W ⊙ s + U Vᵀ`` than
    through the factored op (CPU float32/float64 only, where this was measured: merged 2.3× faster for 64
    channels at 32×32, factored 1.1× faster for 256 channels at 8×8).

    Merged: the conv, its input gradient and its weight gradient ``dW_t`` (``N·H_out·W_out·C_out·C_in·kh·kw``
    multiply-adds), then ``dr, ds, dU, dV`` from ``dW_t`` at the cost of the weight.  Factored: the conv and its
    input gradient, plus the low-rank branch (1×1 convs with ``k`` channels, three per side forward and
    backward) and the elementwise passes over the activations.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.shape[0] == 0:
        return False
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = conv_out_hw(x, weight, stride, padding, dilation)
    activations = n * (h * w * c_in + h_out * w_out * c_out)
    merged = n * h_out * w_out * c_out * c_in * kh * kw
    return merged < activations * (3 * k + _PASS_MACS * _FACTORED_PASSES)
