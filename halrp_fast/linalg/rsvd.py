"""Batched randomized SVD (Halko, Martinsson & Tropp 2011, Algorithms 4.4 and 5.1).

For ``A (m, n)`` and a target rank ``k``: a Gaussian sketch ``Y = A Ω`` with ``l = k + oversample`` columns,
``power_iters`` rounds of ``Q ← orth(A orth(Aᵀ Q))`` (re-orthonormalised every half step so the spectrum's
decay, not round-off, sets the accuracy), then the small SVD of ``B = Qᵀ A (l, n)``.  Every matrix of a
batch goes through the same batched GEMMs / QR / SVD; a list of matrices of different shapes is grouped by
shape, one batched call per group.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _check(A: torch.Tensor, k: int, oversample: int, power_iters: int) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a tensor (…, m, n) or a list of matrices, got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"A must have shape (..., m, n), got {tuple(A.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A must be float32 or float64, got {A.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"oversample and power_iters must be ≥ 0, got {oversample}, {power_iters}")


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _exact(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[..., :k], S[..., :k], Vh[..., :k, :].mT


def _rsvd_batch(A: torch.Tensor, k: int, oversample: int, power_iters: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = A.shape[-2:]
    k = min(k, m, n)
    width = min(k + oversample, m, n)
    if width >= min(m, n):  # the sketch would be as wide as the matrix: the exact SVD is cheaper and exact
        return _exact(A, k)
    gen_device = generator.device if generator is not None else A.device
    omega = torch.randn(*A.shape[:-2], n, width, generator=generator, dtype=A.dtype, device=gen_device).to(A.device)
    Q = _orth(A @ omega)
    for _ in range(power_iters):
        Q = _orth(A @ _orth((Q.mT @ A).mT))  # (Qᵀ A)ᵀ = Aᵀ Q without a strided GEMM over A
    # SVD of B = Qᵀ A (l, n) through the QR of Bᵀ = Q₂ R₂: B = R₂ᵀ Q₂ᵀ, so only the l × l R₂ᵀ is decomposed.
    Q2, R2 = torch.linalg.qr((Q.mT @ A).mT, mode="reduced")
    Ur, S, Vrh = torch.linalg.svd(R2.mT)
    return (Q @ Ur)[..., :k], S[..., :k], (Q2 @ Vrh.mT)[..., :k]


def rsvd(A: torch.Tensor | Sequence[torch.Tensor], k: int, oversample: int = 10, power_iters: int = 2,
         generator: torch.Generator | None = None, exact: bool = False):
    """Top-``k`` singular triplets: ``U (…, m, k')``, ``S (…, k')``, ``V (…, n, k')`` with
    ``k' = min(k, m, n)`` and ``A ≈ U diag(S) Vᵀ``.

    ``A``: a tensor ``(…, m, n)`` (float32/float64), or a list of matrices of any shapes (then a list of
    triplets comes back, in order; matrices of one shape share one batched call).  ``generator`` makes the
    sketch deterministic.  ``exact=True`` uses ``torch.linalg.svd`` (the reference).  When ``k +
    oversample`` reaches ``min(m, n)`` the exact SVD is used as well.
    """
    if isinstance(A, (list, tuple)):
        out: list = [None] * len(A)
        groups: dict[tuple, list[int]] = {}
        for i, M in enumerate(A):
            _check(M, k, oversample, power_iters)
            if M.dim() != 2:
                raise ValueError(f"A[{i}] must be a matrix (m, n), got {tuple(M.shape)}")
            groups.setdefault((tuple(M.shape), M.dtype, M.device), []).append(i)
        for idx in groups.values():
            U, S, V = rsvd(torch.stack([A[i] for i in idx]), k, oversample, power_iters, generator, exact)
            for j, i in enumerate(idx):
                out[i] = (U[j], S[j], V[j])
        return out
    _check(A, k, oversample, power_iters)
    if exact:
        return _exact(A, min(k, *A.shape[-2:]))
    return _rsvd_batch(A, k, oversample, power_iters, generator)
