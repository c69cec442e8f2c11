"""Singular value decompositions of every layer's discrepancy, batched by shape."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerSpectrum:
    """SVD of one layer's discrepancy ``D (out, in) = U diag(S) Vᵀ`` (descending ``S``).

    ``energy`` is ``‖D‖_F² = Σ σ_i²`` (exact even when only the top values are kept).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    energy: float


def layer_spectra(mats: dict[str, torch.Tensor]) -> dict[str, LayerSpectrum]:
    """Exact SVD of every matrix; matrices of one shape go through one batched ``torch.linalg.svd``."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, D in mats.items():
        if D.dim() != 2:
            raise ValueError(f"{name}: expected a matrix, got shape {tuple(D.shape)}")
        by_shape.setdefault(tuple(D.shape), []).append(name)
    out: dict[str, LayerSpectrum] = {}
    for names in by_shape.values():
        batch = torch.stack([mats[n].detach() for n in names])
        U, S, Vh = torch.linalg.svd(batch, full_matrices=False)
        energy = batch.double().pow(2).sum((1, 2))
        for i, n in enumerate(names):
            out[n] = LayerSpectrum(U[i], S[i], Vh[i].T, float(energy[i]))
    return out
