"""Task containers and deterministic loaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


@dataclass
class TaskData:
    """One task of a stream: loaders yielding ``(x, y)`` with labels ``0..num_classes−1``."""

    name: str
    num_classes: int
    train: DataLoader
    val: DataLoader | None
    test: DataLoader


def make_loader(dataset: Dataset | tuple[torch.Tensor, torch.Tensor], batch_size: int, shuffle: bool,
                seed: int = 0) -> DataLoader:
    """A loader whose shuffling depends only on ``seed`` (not on the global RNG)."""
    if isinstance(dataset, tuple):
        dataset = TensorDataset(*dataset)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """A random partition of ``range(n)`` into parts of the given fractions (the last takes the rest)."""
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be ≥ 0 and sum to ≤ 1, got {fractions}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for i, f in enumerate(fractions):
        end = n if i == len(fractions) - 1 else start + int(round(f * n))
        parts.append(perm[start:end])
        start = end
    return parts
