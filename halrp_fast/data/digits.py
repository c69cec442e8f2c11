"""Permuted digits: scikit-learn's bundled 8×8 digits (1,797 images), one pixel permutation per task.

The embedded default stream of ``halrp-fast demo``: no download, real data.
"""
from __future__ import annotations

import torch

from .stream import TaskData, make_loader, split_indices


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """``x (1797, 1, 8, 8)`` in ``[0, 1]`` and labels ``y (1797,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits data ships with scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)


def permuted_digits(num_tasks: int = 10, batch_size: int = 128, seed: int = 0,
                    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3), max_per_task: int | None = None,
                    normalize: bool = True, subset: float = 1.0) -> list[TaskData]:
    """``num_tasks`` tasks of 10 classes; task ``t`` applies permutation ``t`` to the 64 pixels (task 0 too).

    The train / val / test split (``fractions``) is fixed by ``seed`` and shared by all tasks;
    ``subset`` keeps that fraction of the training samples and ``max_per_task`` caps them.  Inputs are
    standardised with the training mean/std.  As in the paper's PMNIST: training batches reshuffled every epoch,
    the last partial one dropped; validation and test batches of ``batch_size``.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
    x, y = load_digits_tensors()
    train_idx, val_idx, test_idx = split_indices(len(x), fractions, seed)
    if not 0 < subset <= 1:
        raise ValueError(f"subset must be in (0, 1], got {subset}")
    train_idx = train_idx[: max(1, int(-(-subset * len(train_idx) // 1)))]
    if max_per_task is not None:
        train_idx = train_idx[:max_per_task]
    if normalize:
        mean, std = x[train_idx].mean(), x[train_idx].std()
        x = (x - mean) / std
    gen = torch.Generator().manual_seed(seed + 1)
    tasks = []
    for t in range(num_tasks):
        perm = torch.randperm(64, generator=gen)
        xt = x.view(len(x), 64)[:, perm].view_as(x)
        tasks.append(TaskData(
            name=f"pdigits-{t}", num_classes=10,
            train=make_loader((xt[train_idx], y[train_idx]), batch_size, True, drop_last=True),
            val=make_loader((xt[val_idx], y[val_idx]), batch_size, False) if len(val_idx) else None,
            test=make_loader((xt[test_idx], y[test_idx]), batch_size, False),
        ))
    return tasks
