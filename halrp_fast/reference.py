"""The ``reference`` provider: readable PyTorch math of every op, forward and backward, single and mixed task.

It serves every op on every device (the CPU path, and the fallback wherever no faster provider serves), and it
is the twin of the tests' float64 oracle.  The math it shares with kernels and modules (merged weights, the
conv's window sum and low-rank pooling, task grouping) lives in :mod:`halrp_fast._math`.

* linear: ``y = r ⊙ ((s ⊙ x) Wᵀ) + (x V) Uᵀ + b``
* conv:   ``y = r ⊙ conv(s ⊙ x, W) + U · Σ_window(Vᵀ · x) + b``

The mixed-task variants take banks stacked on dim 0 (``R (T, out)``, ``S (T, in)``, ``U (T, out, k)``,
``V (T, in, k)``, ``B (T, out)``) and a task id per row / image.  They do the ``W`` product once for the whole
batch (per-row scales are gathered) and loop over the *distinct* tasks only for the low-rank term.

Every function takes its op's arguments in the schema's order (:mod:`halrp_fast.ops`).  Forward functions take
``save``: with it they also return the tensors the backward reuses — the unscaled base product ``c`` (linear:
``(s ⊙ x) Wᵀ``, conv: ``conv(s ⊙ x, W)``) for ``dr`` and the low-rank intermediate (linear: ``x V``, conv:
``Σ_window(Vᵀ · x)``) for ``dU`` — otherwise empty tensors in their place.  Backward functions recompute what
was not saved, take the mask ``needs`` of the inputs that require a gradient and return an empty tensor in place
of every gradient that is not needed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from ._math import conv1x1, is_saved, lowrank_pool, none_like, per_channel, rows_of, task_groups, window_sum_adjoint

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
def perturbed_linear(x, weight, r, s, U, V, bias, save: bool):
    """``x (..., in)`` → ``(y (..., out), c (..., out), xV (..., k))`` (the last two empty unless ``save``; without
    ``save`` the two are one placeholder)."""
    # As few ATen calls as the math allows: at serving sizes each call costs more than its arithmetic.
    out, inp = weight.shape
    k = U.shape[1]
    x2 = x if x.dim() == 2 else x.reshape(-1, inp)
    c = F.linear(x2 * s, weight)
    if save:
        y = c * r if bias is None else torch.addcmul(bias, c, r)
        xv = torch.mm(x2, V)
        if k:
            y.addmm_(xv, U.T)
        if x2 is x:
            return y, c, xv
        lead = x.shape[:-1]
        return y.reshape(*lead, out), c.reshape(*lead, out), xv.reshape(*lead, k)
    y = c.mul_(r) if bias is None else torch.addcmul(bias, c, r)
    if k:
        y = F.linear(torch.mm(x2, V), U, y)  # y + (x V) Uᵀ: linear takes the (M, out) y as its bias (one addmm)
    empty = none_like(x)
    return (y if x2 is x else y.reshape(*x.shape[:-1], out)), empty, empty


def perturbed_linear_backward(grad, x, weight, r, s, U, V, c, xv, has_bias: bool, needs: Sequence[bool]):
    """Gradients ``(dx, dweight, dr, ds, dU, dV, dbias)``; ``needs`` has the same order; ``c`` and ``xv``
    are the forward's saved tensors (recomputed when empty).  Gradients not needed share one placeholder."""
    nx, nw, nr, ns, nU, nV, nb = needs
    out, inp = weight.shape
    k = U.shape[1]
    if x.dim() == 2:  # the common case: no reshapes (a saved tensor is 2-D, the placeholder 1-D)
        g, x2 = grad, x
        c = c if c.dim() == 2 else None
        xv = xv if xv.dim() == 2 else None
    else:
        g, x2 = grad.reshape(-1, out), x.reshape(-1, inp)
        c = c.reshape(x2.shape[0], out) if is_saved(c, (*x.shape[:-1], out)) else None
        xv = xv.reshape(x2.shape[0], k) if is_saved(xv, (*x.shape[:-1], k)) else None
    empty = none_like(x)
    dx = dw = dr = ds = dU = dV = db = empty
    gr = g * r if nx or ns or nw else None
    gu = torch.mm(g, U) if k and (nx or nV) else None
    if nx or ns:
        gx = torch.mm(gr, weight)  # (M, in): gradient w.r.t. s ⊙ x
        if ns:
            ds = (gx * x2).sum(0)
        if nx:
            dx = gx.mul_(s)
            if k:
                dx.addmm_(gu, V.T)
            dx = dx.reshape(x.shape)
    if nw:
        dw = torch.mm(gr.T, x2 * s)
    if nr:
        dr = (g * (c if c is not None else F.linear(x2 * s, weight))).sum(0)
    if nU:
        dU = torch.mm(g.T, xv if xv is not None else torch.mm(x2, V))
    if nV:
        dV = torch.mm(x2.T, gu) if k else torch.zeros_like(V)
    if nb and has_bias:
        db = g.sum(0)
    return dx, dw, dr, ds, dU, dV, db


# --------------------------------------------------------------------------------------------
# linear, mixed tasks
# --------------------------------------------------------------------------------------------
def perturbed_linear_mt(x, task_ids, weight, R, S, U, V, B, save: bool):
    """``x (M, ..., in)``, ``task_ids (M,)`` → ``(y, c, xV)`` like :func:`perturbed_linear`; row m uses bank
    entry ``task_ids[m]`` (``xV`` of a row uses its own task's ``V``)."""
    out, k = weight.shape[0], U.shape[2]
    lead = x.shape[:-1]
    x2, ids = rows_of(x, task_ids)
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
        return y.reshape(*lead, out), none_like(x), none_like(x)
    return y.reshape(*lead, out), c.reshape(*lead, out), xv.reshape(*lead, k)


def perturbed_linear_mt_backward(grad, x, task_ids, weight, R, S, U, V, c, xv, has_bias: bool,
                                 needs: Sequence[bool]):
    """Gradients ``(dx, dweight, dR, dS, dU, dV, dB)`` with the shapes of the inputs."""
    nx, nw, nr, ns, nU, nV, nb = needs
    out, inp = weight.shape
    x2, ids = rows_of(x, task_ids)
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
    return tuple(none_like(x) if t is None else t for t in (dx, dw, dR, dS, dU, dV, dB))


# --------------------------------------------------------------------------------------------
# conv, one task
# --------------------------------------------------------------------------------------------
def perturbed_conv2d(x, weight, r, s, U, V, bias, save: bool, stride, padding, dilation):
    """``x (N, C_in, H, W)`` → ``(y (N, C_out, H_out, W_out), c (like y), pooled (N, k, H_out, W_out))``,
    the last two empty unless ``save``."""
    kernel = weight.shape[-2:]
    c = F.conv2d(x * per_channel(s), weight, None, stride, padding, dilation)
    y = c * per_channel(r) if save else c.mul_(per_channel(r))
    pooled = None
    if U.shape[1]:
        pooled = lowrank_pool(x, V, kernel, stride, padding, dilation)
        y.add_(conv1x1(pooled, U))
    if bias is not None:
        y.add_(per_channel(bias))
    if not save:
        return y, none_like(x), none_like(x)
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
        gz = window_sum_adjoint(conv1x1(g, U.T), x.shape[-2:], kernel, stride, padding, dilation)
        if nV:
            dV = torch.einsum("nchw,nkhw->ck", x, gz)
        if nx:
            dx.add_(conv1x1(gz, V))
    elif nV:
        dV = torch.zeros_like(V)
    if nb and has_bias:
        db = g.sum((0, 2, 3))
    return tuple(none_like(x) if t is None else t for t in (dx, dw, dr, ds, dU, dV, db))


# --------------------------------------------------------------------------------------------
# conv, mixed tasks
# --------------------------------------------------------------------------------------------
def perturbed_conv2d_mt(x, task_ids, weight, R, S, U, V, B, save: bool, stride, padding, dilation):
    """``x (N, C_in, H, W)``, ``task_ids (N,)`` → ``(y, c, pooled)`` like :func:`perturbed_conv2d`."""
    kernel = weight.shape[-2:]
    k = U.shape[2]
    c = F.conv2d(x * per_channel(S[task_ids]), weight, None, stride, padding, dilation)
    y = c * per_channel(R[task_ids]) if save else c.mul_(per_channel(R[task_ids]))
    pooled = y.new_zeros(y.shape[0], k, *y.shape[2:]) if save else None
    if k:
        for t, idx in task_groups(task_ids):
            p = lowrank_pool(x.index_select(0, idx), V[t], kernel, stride, padding, dilation)
            y.index_add_(0, idx, conv1x1(p, U[t]))
            if save:
                pooled.index_copy_(0, idx, p)
    if B is not None:
        y.add_(per_channel(B[task_ids]))
    if not save:
        return y, none_like(x), none_like(x)
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
                gz = window_sum_adjoint(conv1x1(gi, U[t].T), x.shape[-2:], kernel, stride, padding, dilation)
                if nV:
                    dV[t] = torch.einsum("nchw,nkhw->ck", xi, gz)
                if nx:
                    dx.index_add_(0, idx, conv1x1(gz, V[t]))
    if nb and has_bias:
        dB = torch.zeros(R.shape[0], R.shape[1], dtype=g.dtype, device=g.device).index_add_(0, ids, g.sum((2, 3)))
    return tuple(none_like(x) if t is None else t for t in (dx, dw, dR, dS, dU, dV, dB))
