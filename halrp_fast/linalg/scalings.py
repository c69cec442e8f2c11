"""Least-squares fit ``W_free ≈ diag(r) W diag(s)`` and the discrepancy ``D`` (vectorised, no row loops).

For a conv weight ``(C_out, C_in, kh, kw)`` the sums also run over the kernel positions and ``D`` is
averaged over them, giving a ``(C_out, C_in)`` matrix like a linear layer's.
"""
from __future__ import annotations

import torch

from ..ops import fit_scalings as fit_scalings_op


def _check(W_free: torch.Tensor, W: torch.Tensor) -> None:
    if W_free.shape != W.shape:
        raise ValueError(f"W_free must have the shape of W {tuple(W.shape)}, got {tuple(W_free.shape)}")
    if W.dim() not in (2, 4):
        raise ValueError(f"W must be a linear (out, in) or conv (out, in, kh, kw) weight, got {tuple(W.shape)}")


def fit_scalings(W_free: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``r (out,)`` then ``s (in,)``:

    ``r_j = ⟨W_free[j], W[j]⟩ / max(‖W[j]‖², 1e-20)`` (row fit with s = 1), then
    ``s_i = Σ_j r_j W[j,i] W_free[j,i] / max(Σ_j (r_j W[j,i])², 1e-20)`` (column fit given r).

    Runs the op ``halrp::fit_scalings`` (the compiled one-pass kernel on CPU when the extension is built,
    else the vectorised PyTorch math of :func:`halrp_fast.reference.fit_scalings`).
    """
    _check(W_free, W)
    return tuple(fit_scalings_op(W_free.detach(), W.detach()))


def discrepancy(W_free: torch.Tensor, W: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``D = W_free − diag(r) W diag(s)``: ``(out, in)``; conv: averaged over the kernel positions."""
    _check(W_free, W)
    Wf, Wb = W_free.detach(), W.detach()
    if Wb.dim() == 4:  # D is linear in W and W_free: average over kernel positions first
        Wf, Wb = Wf.mean((2, 3)), Wb.mean((2, 3))
    return torch.addcmul(Wf, r[:, None] * Wb, s[None, :], value=-1)
