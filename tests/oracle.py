"""Independent float64 oracle: every op is computed from the explicit task weight
``W_t = diag(r) W diag(s) + U Vᵀ`` (conv: the same U Vᵀ at every kernel position) with plain
``F.linear`` / ``F.conv2d``, one sample at a time for the mixed-task ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def d(t):
    return None if t is None else t.double()


def linear_weight(W, r, s, U, V):
    return d(r)[:, None] * d(W) * d(s)[None, :] + d(U) @ d(V).T


def conv_weight(W, r, s, U, V):
    lr = (d(U) @ d(V).T)[:, :, None, None].expand_as(d(W))
    return d(r)[:, None, None, None] * d(W) * d(s)[None, :, None, None] + lr


def linear(x, W, r, s, U, V, b=None):
    return F.linear(d(x), linear_weight(W, r, s, U, V), d(b))


def conv(x, W, r, s, U, V, b=None, stride=1, padding=0, dilation=1):
    return F.conv2d(d(x), conv_weight(W, r, s, U, V), d(b), stride, padding, dilation)


def linear_mt(x, ids, W, R, S, U, V, B=None):
    rows = [linear(x[m], W, R[t], S[t], U[t], V[t], None if B is None else B[t]) for m, t in enumerate(ids.tolist())]
    return torch.stack(rows) if rows else d(x).new_zeros(*x.shape[:-1], W.shape[0])


def conv_mt(x, ids, W, R, S, U, V, B=None, stride=1, padding=0, dilation=1):
    outs = [conv(x[n:n + 1], W, R[t], S[t], U[t], V[t], None if B is None else B[t], stride, padding, dilation)
            for n, t in enumerate(ids.tolist())]
    if not outs:  # an empty batch: any task's weight gives the (0, C_out, H_out, W_out) shape
        return conv(x, W, R[0], S[0], U[0], V[0], None, stride, padding, dilation)
    return torch.cat(outs)


def tol(dtype):
    """(rtol, atol) for comparing an fp32/fp64 result with the oracle."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)}[dtype]


def scale(t) -> float:
    """Largest magnitude of ``t`` (at least 1), so tolerances follow the size of the output."""
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def assert_close(actual, expected, dtype):
    rtol, atol = tol(dtype)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale(expected))


def assert_low_precision(actual, baseline, expected):
    """Low-precision rule: error of ``actual`` ≤ 2 × error of ``baseline`` (the same math in PyTorch at
    that dtype), both measured against the float64 ``expected``; a small floor covers exact baselines."""
    err = (actual.double() - expected).abs().max().item()
    base = (baseline.double() - expected).abs().max().item()
    floor = 1e-3 * scale(expected)
    assert err <= 2 * base + floor, f"error {err:.3g} > 2 × PyTorch's {base:.3g} (+{floor:.1g})"


def block_diagonal_conv_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's ``(C_out, C_in/G, kh, kw)`` weight as the dense ``(C_out, C_in, kh, kw)`` weight of the same
    conv (zero outside the diagonal blocks)."""
    if groups == 1:
        return weight
    c_out, c_in_g = weight.shape[:2]
    dense = weight.new_zeros(c_out, groups, c_in_g, *weight.shape[2:])
    rows = torch.arange(c_out, device=weight.device)
    dense[rows, rows // (c_out // groups)] = weight
    return dense.reshape(c_out, groups * c_in_g, *weight.shape[2:])


def task_weight(W, r, s, U, V, groups: int = 1) -> torch.Tensor:
    """Task weight in float64 as the plain layer holds it: ``(out, in)`` for a linear layer; a conv's ``(C_out,
    C_in/G, kh, kw)``, the diagonal blocks of the dense conv weight (``U Vᵀ`` at every kernel position)."""
    if W.dim() == 2:
        return linear_weight(W, r, s, U, V)
    dense = conv_weight(block_diagonal_conv_weight(d(W), groups), r, s, U, V)
    c_out, c_in_g = W.shape[:2]
    rows = torch.arange(c_out)
    blocks = dense.unflatten(1, (groups, c_in_g))[rows, rows // (c_out // groups)]
    return blocks
