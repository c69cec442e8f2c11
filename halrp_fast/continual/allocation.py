"""Hessian-aware global rank allocation and the low-rank initialisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import LayerSpectrum, layer_spectra


@dataclass
class Allocation:
    """``ranks[layer]``; ``explained[layer]`` = share of the layer's ‖D‖² its kept values explain;
    ``counts[layer]`` = the layer's values in the kept prefix before clamping."""

    ranks: dict[str, int]
    explained: dict[str, float]
    counts: dict[str, int]


def allocate_ranks(spectra: dict[str, LayerSpectrum], importance: dict[str, float], kernel_area: dict[str, int],
                   approx_rate: float, upper_rank: int, mode: str = "hessian") -> Allocation:
    """Score ``k_h·k_w·σ_i²·importance_l`` for every singular value of every layer, sort all scores
    descending, keep the shortest prefix whose cumulative share of the total exceeds ``approx_rate``;
    a layer's rank is its count in that prefix, clamped to ``[1, min(upper_rank, out, in)]``.

    The total includes the energy of singular values that were not computed (``energy − Σ σ²``), so
    the shares are exact when a spectrum is truncated.  ``mode="flat"`` gives every layer
    ``upper_rank`` (clamped to its size).
    """
    if mode not in ("hessian", "flat"):
        raise ValueError(f"mode must be 'hessian' or 'flat', got {mode!r}")
    if not 0 < approx_rate <= 1:
        raise ValueError(f"approx_rate must be in (0, 1], got {approx_rate}")
    if upper_rank < 1:
        raise ValueError(f"upper_rank must be ≥ 1, got {upper_rank}")
    names = list(spectra)
    caps = {n: max(1, min(upper_rank, spectra[n].rank_limit)) for n in names}
    counts_d = {n: caps[n] for n in names}
    if mode == "flat":
        ranks = dict(caps)
    else:
        weights = {n: kernel_area[n] * importance[n] for n in names}
        scores = torch.cat([spectra[n].S.double().pow(2) * weights[n] for n in names])
        owner = torch.cat([torch.full((spectra[n].S.numel(),), i) for i, n in enumerate(names)])
        tail = sum(max(spectra[n].energy - float(spectra[n].S.double().pow(2).sum()), 0.0) * weights[n] for n in names)
        total = float(scores.sum()) + tail
        counts = torch.zeros(len(names), dtype=torch.long)
        if total > 0:
            order = torch.argsort(scores, descending=True, stable=True)
            share = torch.cumsum(scores[order], 0) / total
            above = (share > approx_rate).nonzero()
            keep = int(above[0]) + 1 if above.numel() else len(order)
            counts = torch.bincount(owner[order[:keep]], minlength=len(names))
        counts_d = {n: int(counts[i]) for i, n in enumerate(names)}
        ranks = {n: int(min(max(counts_d[n], 1), caps[n])) for n in names}
    explained = {}
    for n in names:
        e = spectra[n].energy
        kept = float(spectra[n].S[: ranks[n]].double().pow(2).sum())
        explained[n] = min(1.0, kept / e) if e > 0 else 1.0  # σ from float32 may overshoot ‖D‖² by rounding
    return Allocation(ranks, explained, counts_d)


def allocate_adaptive(mats: dict[str, torch.Tensor], importance: dict[str, float], kernel_area: dict[str, int],
                      approx_rate: float, upper_rank: int, mode: str = "hessian", method: str = "rsvd", k0: int = 16,
                      oversample: int = 10, power_iters: int = 2,
                      generator: torch.Generator | None = None) -> tuple[dict[str, LayerSpectrum], Allocation]:
    """Global allocation from truncated spectra, growing each layer's sketch until it is large enough.

    Starting from ``k0`` values per layer, a layer whose count in the kept prefix reaches its number of
    computed values gets twice as many (up to its full spectrum) and the allocation is redone.  Once every
    count is below its layer's computed values, all values in the prefix are known, and with the exact
    energies ``‖D‖_F²`` for the tails the ranks equal those of the full exact spectra, up to values whose scores
    lie within the randomized values' accuracy of the cut: on the flat tail of a trained network's discrepancy
    the values near the end of a sketch can be ~1 % off, and two layers then trade one rank at a near-tie.
    ``mode="flat"`` computes ``upper_rank`` values per layer at once.
    """
    full = {n: min(D.shape[-2:]) for n, D in mats.items()}
    if mode == "flat":
        k = {n: min(upper_rank, full[n]) for n in mats}
    else:
        k = {n: min(max(k0, 1), full[n]) for n in mats}
    while True:
        spectra = layer_spectra(mats, k, method, oversample, power_iters, generator)
        alloc = allocate_ranks(spectra, importance, kernel_area, approx_rate, upper_rank, mode)
        if mode == "flat":
            return spectra, alloc
        grow = [n for n in mats if alloc.counts[n] >= k[n] and k[n] < full[n]]
        if not grow:
            return spectra, alloc
        for n in grow:
            k[n] = min(2 * k[n], full[n])


def lowrank_init(spectrum: LayerSpectrum, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``U = U_k √Σ_k (out, k)``, ``V = V_k √Σ_k (in, k)`` so that ``U Vᵀ`` is the best rank-k fit of D."""
    root = spectrum.S[:k].clamp_min(0).sqrt()
    return spectrum.U[:, :k] * root, spectrum.V[:, :k] * root
