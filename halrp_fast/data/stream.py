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
                drop_last: bool = False) -> DataLoader:
    """A loader over ``dataset`` (or a pair of tensors); ``drop_last`` drops a last partial batch.

    Shuffling draws from torch's global RNG, which :class:`~halrp_fast.continual.HALRPLearner` seeds at the
    start of every task, so a run (and a resumed run) is reproducible whatever loaders were used before.
    """
    if isinstance(dataset, tuple):
        dataset = TensorDataset(*dataset)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f"{len(dataset)} samples make no full batch of batch_size={batch_size} (the last partial "
                         f"batch is dropped): use a smaller batch size or more samples")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)


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
