"""Least-squares fit ``W_free ≈ diag(r) W diag(s)`` and the discrepancy ``D`` (vectorised, no row loops).

For a conv weight ``(C_out, C_in, kh, kw)`` the sums also run over the kernel positions and ``D`` is
averaged over them, giving a ``(C_out, C_in)`` matrix like a linear layer's.  A grouped conv (``groups = G``,
weight ``(C_out, C_in/G, kh, kw)``) is fitted as the block-diagonal dense conv it is: ``s`` has ``C_in`` entries,
each fitted over its group's output channels only, and ``D`` is the stack of its ``G`` diagonal blocks
``(G, C_out/G, C_in/G)``.
"""
from __future__ import annotations

import torch

from ..ops import fit_scalings as fit_scalings_op


def _check(W_free: torch.Tensor, W: torch.Tensor) -> None:
    if W_free.shape != W.shape:
        raise ValueError(f"W_free must have the shape of W {tuple(W.shape)}, got {tuple(W_free.shape)}")
    if W.dim() not in (2, 4):
        raise ValueError(f"W must be a linear (out, in) or conv (out, in, kh, kw) weight, got {tuple(W.shape)}")


#: :func:`fit_scalings` methods
SCALINGS = ("least_squares", "authors")


def _grouped_fit(W_free: torch.Tensor, W: torch.Tensor, groups: int, method: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_scalings` of a grouped conv: the row fit as for any conv, the column fit per group."""
    c_out, c_in_g = W.shape[:2]
    P, Q = (W * W_free).sum((2, 3)), (W * W).sum((2, 3))  # (C_out, C_in/G)
    r = P.sum(1) / Q.sum(1).clamp_min(1e-20)
    Pg, Qg, rg = (P.reshape(groups, c_out // groups, c_in_g), Q.reshape(groups, c_out // groups, c_in_g),
                  r.reshape(groups, c_out // groups, 1))
    if method == "authors":
        s = rg.sum(1) * Pg.sum(1) / (rg.pow(2).sum(1) * Qg.sum(1)).clamp_min(1e-20)
    else:
        s = (rg * Pg).sum(1) / (rg.pow(2) * Qg).sum(1).clamp_min(1e-20)
    return r, s.reshape(-1)


def fit_scalings(W_free: torch.Tensor, W: torch.Tensor,
                 method: str = "least_squares", groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``r (out,)`` then ``s (in,)``, both from ``r_j = ⟨W_free[j], W[j]⟩ / max(‖W[j]‖², 1e-20)`` (row fit with
    s = 1).  Then, with ``method``:

    * ``"least_squares"``: ``s_i = Σ_j r_j W[j,i] W_free[j,i] / max(Σ_j (r_j W[j,i])², 1e-20)``, the column fit
      given ``r``;
    * ``"authors"``: what the authors' code computes for that column fit, where a ``(out, 1)`` view of ``r``
      broadcasts against the ``(out,)`` column into an ``(out, out)`` product:
      ``s_i = Σ_j r_j · ⟨W[:,i], W_free[:,i]⟩ / max(Σ_j r_j² · ‖W[:,i]‖², 1e-20)``.

    Conv weights: the sums also run over the kernel positions.  ``"least_squares"`` runs the op
    ``halrp::fit_scalings`` (the compiled one-pass kernel on CPU when the extension is built, else the vectorised
    PyTorch math of :func:`halrp_fast.reference.fit_scalings`).

    ``groups > 1``: a grouped conv's weights; the column sums run over each input channel's group only.
    """
    _check(W_free, W)
    if method not in SCALINGS:
        raise ValueError(f"method must be one of {SCALINGS}, got {method!r}")
    if groups > 1:
        return _grouped_fit(W_free.detach(), W.detach(), groups, method)
    r, s = fit_scalings_op(W_free.detach(), W.detach())
    if method == "authors":
        Wf, Wb = W_free.detach(), W.detach()
        dims = (0, *range(2, Wb.dim()))
        s = r.sum() * (Wb * Wf).sum(dims) / (r.pow(2).sum() * Wb.pow(2).sum(dims)).clamp_min(1e-20)
    return r, s


def discrepancy(W_free: torch.Tensor, W: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
                groups: int = 1) -> torch.Tensor:
    """``D = W_free − diag(r) W diag(s)``: ``(out, in)``; conv: averaged over the kernel positions; grouped conv
    (``groups = G > 1``): its diagonal blocks ``(G, C_out/G, C_in/G)``."""
    _check(W_free, W)
    Wf, Wb = W_free.detach(), W.detach()
    if Wb.dim() == 4:  # D is linear in W and W_free: average over kernel positions first
        Wf, Wb = Wf.mean((2, 3)), Wb.mean((2, 3))
    if groups > 1:
        c_out, c_in_g = Wb.shape
        shape = (groups, c_out // groups, c_in_g)
        return torch.addcmul(Wf.reshape(shape), (r[:, None] * Wb).reshape(shape), s.reshape(groups, 1, c_in_g),
                             value=-1)
    return torch.addcmul(Wf, r[:, None] * Wb, s[None, :], value=-1)
