"""Least-squares fit ``W_free ≈ diag(r) W diag(s)`` and the discrepancy ``D`` (vectorised, no row loops).

For a conv weight ``(C_out, C_in, kh, kw)`` the sums also run over the kernel positions and ``D`` is
averaged over them, giving a ``(C_out, C_in)`` matrix like a linear layer's.
"""
from __future__ import annotations

import torch

_EPS = 1e-20


def _check(W_free: torch.Tensor, W: torch.Tensor) -> None:
    if W_free.shape != W.shape:
        raise ValueError(f"W_free must have the shape of W {tuple(W.shape)}, got {tuple(W_free.shape)}")
    if W.dim() not in (2, 4):
        raise ValueError(f"W must be a linear (out, in) or conv (out, in, kh, kw) weight, got {tuple(W.shape)}")


def fit_scalings(W_free: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``r (out,)`` then ``s (in,)``:

    ``r_j = ⟨W_free[j], W[j]⟩ / max(‖W[j]‖², 1e-20)`` (row fit with s = 1), then
    ``s_i = Σ_j r_j W[j,i] W_free[j,i] / max(Σ_j (r_j W[j,i])², 1e-20)`` (column fit given r).
    """
    _check(W_free, W)
    Wf, Wb = W_free.detach(), W.detach()
    row_dims = tuple(range(1, Wb.dim()))
    r = (Wf * Wb).sum(row_dims) / (Wb * Wb).sum(row_dims).clamp_min(_EPS)
    rW = Wb * r.view(-1, *([1] * (Wb.dim() - 1)))
    col_dims = (0,) + tuple(range(2, Wb.dim()))
    s = (rW * Wf).sum(col_dims) / (rW * rW).sum(col_dims).clamp_min(_EPS)
    return r, s


def discrepancy(W_free: torch.Tensor, W: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``D = W_free − diag(r) W diag(s)``: ``(out, in)``; conv: averaged over the kernel positions."""
    _check(W_free, W)
    shape = (-1, 1) + (1,) * (W.dim() - 2)
    D = W_free.detach() - r.view(shape) * W.detach() * s.view(1, -1, *([1] * (W.dim() - 2)))
    return D.mean((2, 3)) if D.dim() == 4 else D
