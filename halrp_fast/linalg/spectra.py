"""Singular value decompositions of every layer's discrepancy, batched by shape."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rsvd import rsvd


@dataclass
class LayerSpectrum:
    """(Top of the) SVD of one layer's discrepancy ``D (out, in) ≈ U diag(S) Vᵀ`` (descending ``S``).

    ``energy`` is ``‖D‖_F² = Σ σ_i²`` over the *whole* spectrum, exact even when ``S`` is truncated.

    A grouped conv's discrepancy is a stack of ``G`` blocks ``D_g``; its spectrum (:func:`grouped_spectrum`) has
    ``σ_j = (Σ_g σ_{g,j}²)^½`` (rank ``j`` in every group at once) and ``max_rank = min(C_out, C_in) / G``.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    energy: float
    max_rank: int | None = None  # None: min(out, in)

    @property
    def rank_limit(self) -> int:
        """The largest rank the layer can take."""
        return min(self.U.shape[0], self.V.shape[0]) if self.max_rank is None else self.max_rank

    @property
    def complete(self) -> bool:
        """True when ``S`` holds every singular value."""
        return self.S.numel() == self.rank_limit


def grouped_spectrum(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, energy: float) -> LayerSpectrum:
    """One spectrum from the SVDs ``U (G, a, k)``, ``S (G, k)``, ``V (G, b, k)`` of a grouped conv's blocks.

    Component ``j`` holds the ``j``-th triplet of every group: ``σ_j = (Σ_g σ_{g,j}²)^½``, and the rows of group
    ``g`` in ``U[:, j]``, ``V[:, j]`` are ``u_{g,j} (σ_{g,j}/σ_j)^½``, ``v_{g,j} (σ_{g,j}/σ_j)^½``, so that the
    rank-k initialisation ``U_k √Σ_k``, ``V_k √Σ_k`` gives every block its best rank-k fit
    ``Σ_{j<k} σ_{g,j} u_{g,j} v_{g,j}ᵀ``.
    """
    total = S.pow(2).sum(0).sqrt()  # (k,)
    weight = (S / total.clamp_min(torch.finfo(S.dtype).tiny)).sqrt()[:, None, :]  # (G, 1, k)
    g, a, k = U.shape
    return LayerSpectrum((U * weight).reshape(g * a, k), total, (V * weight).reshape(g * V.shape[1], k), energy,
                         max_rank=min(a, V.shape[1]))


def layer_spectra(mats: dict[str, torch.Tensor], k: dict[str, int] | int | None = None, method: str = "exact",
                  oversample: int = 10, power_iters: int = 2,
                  generator: torch.Generator | None = None) -> dict[str, LayerSpectrum]:
    """SVD of every matrix, one batched call per (shape, k).

    ``k=None``: the full spectrum (exact).  Otherwise the top ``k`` (per layer or for all) singular
    triplets, by randomized SVD (``method="rsvd"``) or truncated exact SVD (``"exact"``).  A 3-D entry
    ``(G, a, b)`` is a grouped conv's blocks: its ``G`` SVDs join the batch and make one :func:`grouped_spectrum`.
    """
    if method not in ("exact", "rsvd"):
        raise ValueError(f"method must be 'exact' or 'rsvd', got {method!r}")
    groups: dict[tuple, list[str]] = {}
    for name, D in mats.items():
        if D.dim() not in (2, 3):
            raise ValueError(f"{name}: expected a matrix or a stack of group blocks, got shape {tuple(D.shape)}")
        full = min(D.shape[-2:])
        kk = full if k is None else min(full, k if isinstance(k, int) else k[name])
        groups.setdefault((tuple(D.shape), kk), []).append(name)
    out: dict[str, LayerSpectrum] = {}
    for (shape, kk), names in groups.items():
        batch = torch.stack([mats[n].detach() for n in names])
        flat = batch.reshape(-1, *shape[-2:])
        U, S, V = rsvd(flat, kk, oversample, power_iters, generator, exact=(method == "exact" or kk == min(shape[-2:])))
        # ‖D‖_F² in float32 (pairwise reduction, ~1e-6 relative): a float64 copy of D costs more than the rsvd
        energy = torch.linalg.vector_norm(batch.reshape(len(names), -1), dim=1).double() ** 2
        if len(shape) == 3:
            U, S, V = (t.reshape(len(names), shape[0], *t.shape[1:]) for t in (U, S, V))
        for i, n in enumerate(names):
            make = grouped_spectrum if len(shape) == 3 else LayerSpectrum
            out[n] = make(U[i], S[i], V[i], float(energy[i]))
    return out
