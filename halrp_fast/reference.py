"""Readable PyTorch math of every op: the CPU path, the fallback on every device, and the twin of
the tests' float64 oracle.

Notation (one layer, one task):  ``W`` the frozen base weight, ``r`` the output scale, ``s`` the
input scale, ``U (out, k)``, ``V (in, k)`` the low-rank perturbation, ``b`` the task bias.

* linear: ``y = r ⊙ ((s ⊙ x) Wᵀ) + (x V) Uᵀ + b``
* conv:   ``y = r ⊙ conv(s ⊙ x, W) + U · Σ_window(Vᵀ · x) + b``, the low-rank weight being the same
  at every kernel position, so it is a 1×1 conv by ``Vᵀ``, a sum over the kernel window (same stride,
  padding and dilation as the conv) and a 1×1 conv by ``U``.

The mixed-task variants take banks stacked on dim 0 (``R (T, out)``, ``S (T, in)``,
``U (T, out, k)``, ``V (T, in, k)``, ``B (T, out)``) and a task id per row / image.  They do the
``W`` product once for the whole batch (per-row scales are gathered) and loop over the *distinct*
tasks only for the low-rank term, so the cost grows with the number of distinct tasks.

Forward functions take ``save``: with it they also return the tensors the backward reuses — the
unscaled base product ``c`` (linear: ``(s ⊙ x) Wᵀ``, conv: ``conv(s ⊙ x, W)``) for ``dr`` and the
low-rank intermediate (linear: ``x V``, conv: ``Σ_window(Vᵀ · x)``) for ``dU`` — so training does not
recompute the base GEMM / conv; without it they return empty tensors in their place.  Backward functions
recompute what was not saved, take the mask ``needs`` of the inputs that require a gradient and return an
empty tensor in place of every gradient that is not needed.

On CPU a single-task conv may instead run through its merged weight (one conv forward, one conv backward for
the input and weight gradients, the task gradients contracted from the latter) when
:func:`conv_through_merged_weight` finds that cheaper; its forward then saves nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from . import _checks

Pair = Sequence[int]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def task_groups(task_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(task, row_indices), ...]`` for the distinct tasks of ``task_ids (M,)``, in ascending task order."""
    if task_ids.numel() == 0:
        return []
    uniq, counts = torch.unique(task_ids, return_counts=True)
    order = torch.argsort(task_ids, stable=True)
    return list(zip(uniq.tolist(), torch.split(order, counts.tolist()), strict=True))


def _none_like(x: torch.Tensor) -> torch.Tensor:
    """Placeholder for a gradient that is not needed, or a tensor that was not saved."""
    return x.new_empty(0)


def is_saved(t: torch.Tensor, shape) -> bool:
    """A forward's saved tensor has its full shape; the placeholder for 'not saved' has shape (0,)."""
    return tuple(t.shape) == tuple(shape)


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


def _conv1x1(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Channel mix ``(N, c, H, W) → (N, d, H, W)`` by ``M (d, c)``."""
    return F.conv2d(x, M[:, :, None, None])


def per_channel(v: torch.Tensor) -> torch.Tensor:
    """``(C,)`` → ``(C, 1, 1)``, or ``(N, C)`` → ``(N, C, 1, 1)``: broadcast over H, W."""
    return v[..., None, None]


# --------------------------------------------------------------------------------------------
# merged weights
# --------------------------------------------------------------------------------------------
def merge_linear_weight(weight, r, s, U, V) -> torch.Tensor:
    """``diag(r) W diag(s) + U Vᵀ``: ``(out, in)``; for banks ``r (T, out)``, ``s (T, in)``, ``U (T, out, k)``,
    ``V (T, in, k)`` the ``T`` merged weights ``(T, out, in)``."""
    scaled = r[..., :, None] * weight * s[..., None, :]
    return torch.addmm(scaled, U, V.T) if r.dim() == 1 else torch.baddbmm(scaled, U, V.mT)


def merge_conv_weight(weight, r, s, U, V) -> torch.Tensor:
    """``r ⊙ W ⊙ s + (U Vᵀ)`` at every kernel position: ``(C_out, C_in, kh, kw)``; for banks (as
    :func:`merge_linear_weight`) the ``T`` merged weights ``(T, C_out, C_in, kh, kw)``."""
    return r[..., :, None, None, None] * weight * s[..., None, :, None, None] + (U @ V.mT)[..., None, None]


# --------------------------------------------------------------------------------------------
# least-squares scalings
# --------------------------------------------------------------------------------------------
_SCALE_EPS = 1e-20


def fit_scalings(W_free: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``r (out,)``, ``s (in,)`` of the fit ``W_free ≈ diag(r) W diag(s)``
    (see :func:`halrp_fast.linalg.fit_scalings`)."""
    # With P = W ⊙ W_free and Q = W ⊙ W summed over kernel positions, both fits are reductions of P and Q:
    # r = P 1 / Q 1 (row sums) and s = rᵀ P / (r ⊙ r)ᵀ Q (two matrix-vector products), two temporaries in all.
    P, Q = W * W_free, W * W
    if P.dim() == 4:
        P, Q = P.sum((2, 3)), Q.sum((2, 3))
    r = P.sum(1) / Q.sum(1).clamp_min(_SCALE_EPS)
    s = (r @ P) / ((r * r) @ Q).clamp_min(_SCALE_EPS)
    return r, s


# --------------------------------------------------------------------------------------------
# linear, one task
# --------------------------------------------------------------------------------------------
def perturbed_linear(x, weight, r, s, U, V, bias, save: bool = False):
    """``x (..., in)`` → ``(y (..., out), c (..., out), xV (..., k))`` (the last two empty unless ``save``)."""
    out, inp = weight.shape
    lead, k = x.shape[:-1], U.shape[1]
    x2 = x.reshape(-1, inp)
    c = F.linear(x2 * s, weight)
    y = c * r if save else c.mul_(r)
    xv = x2 @ V if k else x2.new_zeros(x2.shape[0], 0)
    if k:
        y.addmm_(xv, U.T)
    if bias is not None:
        y.add_(bias)
    if not save:
        return y.reshape(*lead, out), _none_like(x), _none_like(x)
    return y.reshape(*lead, out), c.reshape(*lead, out), xv.reshape(*lead, k)


def perturbed_linear_backward(grad, x, weight, r, s, U, V, c, xv, has_bias: bool, needs: Sequence[bool]):
    """Gradients ``(dx, dweight, dr, ds, dU, dV, dbias)``; ``needs`` has the same order; ``c`` and ``xv``
    are the forward's saved tensors (recomputed when empty)."""
    nx, nw, nr, ns, nU, nV, nb = needs
    out, inp = weight.shape
    g = grad.reshape(-1, out)
    x2 = x.reshape(-1, inp)
    k = U.shape[1]
    c = c.reshape(x2.shape[0], out) if is_saved(c, (*x.shape[:-1], out)) else None
    xv = xv.reshape(x2.shape[0], k) if is_saved(xv, (*x.shape[:-1], k)) else None
    dx = dw = dr = ds = dU = dV = db = None
    if nx or ns:
        gx = (g * r) @ weight  # (M, in): gradient w.r.t. s ⊙ x
        if ns:
            ds = (gx * x2).sum(0)
        if nx:
            dx = gx.mul_(s)
            if k:
                dx.addmm_(g @ U, V.T)
            dx = dx.reshape(x.shape)
    if nw:
        dw = (g * r).T @ (x2 * s)
    if nr:
        dr = (g * (c if c is not None else F.linear(x2 * s, weight))).sum(0)
    if nU:
        dU = g.T @ (xv if xv is not None else x2 @ V)
    if nV:
        dV = x2.T @ (g @ U)
    if nb and has_bias:
        db = g.sum(0)
    return tuple(_none_like(x) if t is None else t for t in (dx, dw, dr, ds, dU, dV, db))


# --------------------------------------------------------------------------------------------
# linear, mixed tasks
# --------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten ``x (M, ..., in)`` to rows ``(M·L, in)`` and repeat each task id over its L rows."""
    inp = x.shape[-1]
    rows = x.reshape(-1, inp)
    per = rows.shape[0] // max(x.shape[0], 1)
    ids = task_ids if per == 1 else task_ids.repeat_interleave(per)
    return rows, ids


def perturbed_linear_mt(x, task_ids, weight, R, S, U, V, B, save: bool = False):
    """``x (M, ..., in)``, ``task_ids (M,)`` → ``(y, c, xV)`` like :func:`perturbed_linear`; row m uses bank
    entry ``task_ids[m]`` (``xV`` of a row uses its own task's ``V``)."""
    out, k = weight.shape[0], U.shape[2]
    lead = x.shape[:-1]
    x2, ids = _rows(x, task_ids)
    c = F.linear(x2 * S[ids], weight)
    y = c * R[ids] if save else c.mul_(R[ids])
    xv = x2.new_zeros(x2.shape[0], k) if save else None
    if k:
        for t, idx in task_groups(ids):
            xvi = x2.index_select(0, idx) @ V[t]
            y.index_add_(0, idx, xvi @ U[t].T)
            if save:
                xv.index_copy_(0, idx, xvi)
    if B is not None:
        y.add_(B[ids])
    if not save:
        return y.reshape(*lead, out), _none_like(x), _none_like(x)
    return y.reshape(*lead, out), c.reshape(*lead, out), xv.reshape(*lead, k)


def perturbed_linear_mt_backward(grad, x, task_ids, weight, R, S, U, V, c, xv, has_bias: bool,
                                 needs: Sequence[bool]):
    """Gradients ``(dx, dweight, dR, dS, dU, dV, dB)`` with the shapes of the inputs."""
    nx, nw, nr, ns, nU, nV, nb = needs
    out, inp = weight.shape
    x2, ids = _rows(x, task_ids)
    c = c.reshape(x2.shape[0], out) if is_saved(c, (*x.shape[:-1], out)) else None
    xv = xv.reshape(x2.shape[0], U.shape[2]) if is_saved(xv, (*x.shape[:-1], U.shape[2])) else None
    g = grad.reshape(-1, out)
    T, k = R.shape[0], U.shape[2]
    s_rows = S[ids]
    dx = dw = dR = dS = dU = dV = dB = None
    if nx or ns:
        gx = (g * R[ids]) @ weight
        if ns:
            dS = torch.zeros_like(S).index_add_(0, ids, gx * x2)
        if nx:
            dx = gx.mul_(s_rows)
    if nw:
        dw = (g * R[ids]).T @ (x2 * s_rows)
    if nr:
        base = c if c is not None else F.linear(x2 * s_rows, weight)
        dR = torch.zeros_like(R).index_add_(0, ids, g * base)
    if nU:
        dU = torch.zeros_like(U)
    if nV:
        dV = torch.zeros_like(V)
    if k and (nx or nU or nV):
        for t, idx in task_groups(ids):
            gi, xi = g.index_select(0, idx), x2.index_select(0, idx)
            gu = gi @ U[t]  # (m, k)
            if nx:
                dx.index_add_(0, idx, gu @ V[t].T)
            if nU:
                dU[t] = gi.T @ (xv.index_select(0, idx) if xv is not None else xi @ V[t])
            if nV:
                dV[t] = xi.T @ gu
    if nb and has_bias:
        dB = torch.zeros(T, out, dtype=g.dtype, device=g.device).index_add_(0, ids, g)
    if dx is not None:
        dx = dx.reshape(x.shape)
    return tuple(_none_like(x) if t is None else t for t in (dx, dw, dR, dS, dU, dV, dB))


# --------------------------------------------------------------------------------------------
# conv, one task
# --------------------------------------------------------------------------------------------
def lowrank_pool(x, V, kernel, stride, padding, dilation) -> torch.Tensor:
    """``Σ_window(Vᵀ · x)``: ``(N, k, H_out, W_out)``; the window sum commutes with the channel mix, so it
    runs on whichever side has fewer channels (k or C_in)."""
    if V.shape[1] <= x.shape[1]:
        return window_sum(_conv1x1(x, V.T), kernel, stride, padding, dilation)
    return _conv1x1(window_sum(x, kernel, stride, padding, dilation), V.T)


# Cost of one elementwise pass over one activation element (read + write), in multiply-adds of a CPU
# convolution, and the passes the factored form makes over the input and output activations (scalings, the
# r-product, bias, the saved product, ds / dr reductions).  Measured on a 2-core x86 machine: oneDNN convs run
# at ≈ 150 GFLOP/s and an elementwise pass costs ≈ 1 ns per element.
_PASS_MACS = 60
_FACTORED_PASSES = 10
#: which form a CPU float32/float64 single-task conv takes: "auto" (the cost rule of
#: :func:`conv_through_merged_weight`), "merged" or "factored" (tests run both)
CONV_STRATEGY = "auto"


def conv_through_merged_weight(x: torch.Tensor, weight: torch.Tensor, k: int, stride: Pair, padding: Pair,
                               dilation: Pair) -> bool:
    """Whether a single-task conv is cheaper to train through its merged weight ``W_t = r ⊙ W ⊙ s + U Vᵀ``.

    Merged: the conv, its input gradient and its weight gradient ``dW_t`` (``N·H_out·W_out·C_out·C_in·kh·kw``
    multiply-adds), then ``dr, ds, dU, dV`` from ``dW_t`` at the cost of the weight.  Factored: the conv and
    its input gradient, plus the low-rank branch (1×1 convs with ``k`` channels, three per side forward and
    backward) and the elementwise passes over the activations.  CPU float32/float64 only, where this was
    measured (merged: 2.3× faster for 64 channels at 32×32, factored 1.1× faster for 256 channels at 8×8).
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.shape[0] == 0:
        return False
    if CONV_STRATEGY != "auto":
        return CONV_STRATEGY == "merged"
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = _checks.conv_out_hw(x, weight, stride, padding, dilation)
    activations = n * (h * w * c_in + h_out * w_out * c_out)
    merged = n * h_out * w_out * c_out * c_in * kh * kw
    return merged < activations * (3 * k + _PASS_MACS * _FACTORED_PASSES)


def _merged_conv_backward(g, x, weight, r, s, U, V, has_bias, stride, padding, dilation, needs):
    """Gradients of the single-task conv through ``W_t``: ``dx`` = conv input gradient by ``W_t``; with
    ``G = dW_t``: ``dr = Σ G ⊙ W ⊙ s``, ``ds = Σ G ⊙ W ⊙ r``, ``dU = (Σ_window G) V``, ``dV = (Σ_window G)ᵀ U``,
    ``dW = G ⊙ r ⊙ s``."""
    nx, nw, nr, ns, nU, nV, nb = needs
    merged = merge_conv_weight(weight, r, s, U, V)
    need_g = nw or nr or ns or nU or nV
    dx, G, _ = torch.ops.aten.convolution_backward(g, x, merged, None, list(stride), list(padding), list(dilation),
                                                   False, [0, 0], 1, [nx, need_g, False])
    dw = dr = ds = dU = dV = db = None
    if need_g:
        if nr or ns:
            gw = (G * weight).sum((2, 3))  # (C_out, C_in)
            dr = gw @ s if nr else None
            ds = gw.T @ r if ns else None
        if nU or nV:
            g_sum = G.sum((2, 3))  # the gradient of U Vᵀ: G summed over the kernel positions
            dU = g_sum @ V if nU else None
            dV = g_sum.T @ U if nV else None
        if nw:
            dw = G * per_channel(s) * r[:, None, None, None]
    if nb and has_bias:
        db = g.sum((0, 2, 3))
    return tuple(_none_like(x) if t is None else t for t in (dx if nx else None, dw, dr, ds, dU, dV, db))


def perturbed_conv2d(x, weight, r, s, U, V, bias, stride, padding, dilation, save: bool = False):
    """``x (N, C_in, H, W)`` → ``(y (N, C_out, H_out, W_out), c (like y), pooled (N, k, H_out, W_out))``,
    the last two empty unless ``save`` (and when the layer runs through its merged weight, see
    :func:`conv_through_merged_weight`: its backward needs neither)."""
    if conv_through_merged_weight(x, weight, U.shape[1], stride, padding, dilation):
        y = F.conv2d(x, merge_conv_weight(weight, r, s, U, V), bias, stride, padding, dilation)
        return y, _none_like(x), _none_like(x)
    kernel = weight.shape[-2:]
    c = F.conv2d(x * per_channel(s), weight, None, stride, padding, dilation)
    y = c * per_channel(r) if save else c.mul_(per_channel(r))
    pooled = None
    if U.shape[1]:
        pooled = lowrank_pool(x, V, kernel, stride, padding, dilation)
        y.add_(_conv1x1(pooled, U))
    if bias is not None:
        y.add_(per_channel(bias))
    if not save:
        return y, _none_like(x), _none_like(x)
    if pooled is None:
        pooled = y.new_zeros(y.shape[0], 0, *y.shape[2:])
    return y, c, pooled


def perturbed_conv2d_backward(grad, x, weight, r, s, U, V, c, pooled, has_bias: bool, stride, padding, dilation,
                              needs: Sequence[bool]):
    """Gradients ``(dx, dweight, dr, ds, dU, dV, dbias)``; ``c``, ``pooled``: the forward's saved tensors."""
    nx, nw, nr, ns, nU, nV, nb = needs
    kernel = tuple(weight.shape[-2:])
    k = U.shape[1]
    g = grad
    c = c if is_saved(c, g.shape) else None
    pooled = pooled if is_saved(pooled, (g.shape[0], k, *g.shape[2:])) else None
    if c is None and pooled is None and conv_through_merged_weight(x, weight, k, stride, padding, dilation):
        return _merged_conv_backward(g, x, weight, r, s, U, V, has_bias, stride, padding, dilation, needs)
    xs = x * per_channel(s) if nw or (nr and c is None) else None
    dx = dw = dr = ds = dU = dV = db = None
    if nx or ns:
        gxs = conv2d_input(x.shape, weight, g * per_channel(r), stride, padding, dilation)
        if ns:
            ds = (gxs * x).sum((0, 2, 3))
        if nx:
            dx = gxs.mul_(per_channel(s))
    if nw:
        dw = conv2d_weight(xs, weight.shape, g * per_channel(r), stride, padding, dilation)
    if nr:
        dr = (g * (c if c is not None else F.conv2d(xs, weight, None, stride, padding, dilation))).sum((0, 2, 3))
    if nU and k:
        if pooled is None:
            pooled = lowrank_pool(x, V, kernel, stride, padding, dilation)
        dU = torch.einsum("nohw,nkhw->ok", g, pooled)
    elif nU:
        dU = torch.zeros_like(U)
    if k and (nx or nV):
        gz = window_sum_adjoint(_conv1x1(g, U.T), x.shape[-2:], kernel, stride, padding, dilation)
        if nV:
            dV = torch.einsum("nchw,nkhw->ck", x, gz)
        if nx:
            dx.add_(_conv1x1(gz, V))
    elif nV:
        dV = torch.zeros_like(V)
    if nb and has_bias:
        db = g.sum((0, 2, 3))
    return tuple(_none_like(x) if t is None else t for t in (dx, dw, dr, ds, dU, dV, db))


# --------------------------------------------------------------------------------------------
# conv, mixed tasks
# --------------------------------------------------------------------------------------------
def perturbed_conv2d_mt(x, task_ids, weight, R, S, U, V, B, stride, padding, dilation, save: bool = False):
    """``x (N, C_in, H, W)``, ``task_ids (N,)`` → ``(y, c, pooled)`` like :func:`perturbed_conv2d`."""
    kernel = weight.shape[-2:]
    k = U.shape[2]
    c = F.conv2d(x * per_channel(S[task_ids]), weight, None, stride, padding, dilation)
    y = c * per_channel(R[task_ids]) if save else c.mul_(per_channel(R[task_ids]))
    pooled = y.new_zeros(y.shape[0], k, *y.shape[2:]) if save else None
    if k:
        for t, idx in task_groups(task_ids):
            p = lowrank_pool(x.index_select(0, idx), V[t], kernel, stride, padding, dilation)
            y.index_add_(0, idx, _conv1x1(p, U[t]))
            if save:
                pooled.index_copy_(0, idx, p)
    if B is not None:
        y.add_(per_channel(B[task_ids]))
    if not save:
        return y, _none_like(x), _none_like(x)
    return y, c, pooled


def perturbed_conv2d_mt_backward(grad, x, task_ids, weight, R, S, U, V, c, pooled, has_bias: bool, stride,
                                 padding, dilation, needs: Sequence[bool]):
    """Gradients ``(dx, dweight, dR, dS, dU, dV, dB)``."""
    nx, nw, nr, ns, nU, nV, nb = needs
    kernel = tuple(weight.shape[-2:])
    k = U.shape[2]
    g, ids = grad, task_ids
    c = c if is_saved(c, g.shape) else None
    pooled = pooled if is_saved(pooled, (g.shape[0], k, *g.shape[2:])) else None
    s_img, r_img = per_channel(S[ids]), per_channel(R[ids])
    xs = x * s_img
    dx = dw = dR = dS = dU = dV = dB = None
    if nx or ns:
        gxs = conv2d_input(x.shape, weight, g * r_img, stride, padding, dilation)
        if ns:
            dS = torch.zeros_like(S).index_add_(0, ids, (gxs * x).sum((2, 3)))
        if nx:
            dx = gxs.mul_(s_img)
    if nw:
        dw = conv2d_weight(xs, weight.shape, g * r_img, stride, padding, dilation)
    if nr:
        base = c if c is not None else F.conv2d(xs, weight, None, stride, padding, dilation)
        dR = torch.zeros_like(R).index_add_(0, ids, (g * base).sum((2, 3)))
    if nU:
        dU = torch.zeros_like(U)
    if nV:
        dV = torch.zeros_like(V)
    if k and (nx or nU or nV):
        for t, idx in task_groups(ids):
            gi, xi = g.index_select(0, idx), x.index_select(0, idx)
            if nU:
                pi = pooled.index_select(0, idx) if pooled is not None else \
                    lowrank_pool(xi, V[t], kernel, stride, padding, dilation)
                dU[t] = torch.einsum("nohw,nkhw->ok", gi, pi)
            if nx or nV:
                gz = window_sum_adjoint(_conv1x1(gi, U[t].T), x.shape[-2:], kernel, stride, padding, dilation)
                if nV:
                    dV[t] = torch.einsum("nchw,nkhw->ck", xi, gz)
                if nx:
                    dx.index_add_(0, idx, _conv1x1(gz, V[t]))
    if nb and has_bias:
        dB = torch.zeros(R.shape[0], R.shape[1], dtype=g.dtype, device=g.device).index_add_(0, ids, g.sum((2, 3)))
    return tuple(_none_like(x) if t is None else t for t in (dx, dw, dR, dS, dU, dV, dB))
