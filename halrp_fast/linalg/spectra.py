"""Singular value decompositions of every layer's discrepancy, batched by shape."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rsvd import rsvd


@dataclass
class LayerSpectrum:
    """(Top of the) SVD of one layer's discrepancy ``D (out, in) ≈ U diag(S) Vᵀ`` (descending ``S``).

    ``energy`` is ``‖D‖_F² = Σ σ_i²`` over the *whole* spectrum, exact even when ``S`` is truncated.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    energy: float

    @property
    def complete(self) -> bool:
        """True when ``S`` holds every singular value."""
        return self.S.numel() == min(self.U.shape[0], self.V.shape[0])


def layer_spectra(mats: dict[str, torch.Tensor], k: dict[str, int] | int | None = None, method: str = "exact",
                  oversample: int = 10, power_iters: int = 2,
                  generator: torch.Generator | None = None) -> dict[str, LayerSpectrum]:
    """SVD of every matrix, one batched call per (shape, k).

    ``k=None``: the full spectrum (exact).  Otherwise the top ``k`` (per layer or for all) singular
    triplets, by randomized SVD (``method="rsvd"``) or truncated exact SVD (``"exact"``).
    """
    if method not in ("exact", "rsvd"):
        raise ValueError(f"method must be 'exact' or 'rsvd', got {method!r}")
    groups: dict[tuple, list[str]] = {}
    for name, D in mats.items():
        if D.dim() != 2:
            raise ValueError(f"{name}: expected a matrix, got shape {tuple(D.shape)}")
        full = min(D.shape)
        kk = full if k is None else min(full, k if isinstance(k, int) else k[name])
        groups.setdefault((tuple(D.shape), kk), []).append(name)
    out: dict[str, LayerSpectrum] = {}
    for (shape, kk), names in groups.items():
        batch = torch.stack([mats[n].detach() for n in names])
        U, S, V = rsvd(batch, kk, oversample, power_iters, generator, exact=(method == "exact" or kk == min(shape)))
        # ‖D‖_F² in float32 (pairwise reduction, ~1e-6 relative): a float64 copy of D costs more than the rsvd
        energy = torch.linalg.vector_norm(batch, dim=(1, 2)).double() ** 2
        for i, n in enumerate(names):
            out[n] = LayerSpectrum(U[i], S[i], V[i], float(energy[i]))
    return out
