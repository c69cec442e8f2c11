"""Task-stream builders over one labelled image dataset: permuted pixels, or classes split into tasks."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .stream import TaskData, split_indices
from .transforms import BatchLoader, image_transform


def _train_val(n: int, valid_frac: float, seed: int, max_per_task: int | None,
               subset: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled train / validation indices of ``n`` samples; ``subset`` keeps that fraction of them first (as the
    paper's train_size), ``max_per_task`` then caps the training part."""
    if not 0 <= valid_frac < 1:
        raise ValueError(f"valid_frac must be in [0, 1), got {valid_frac}")
    if not 0 < subset <= 1:
        raise ValueError(f"subset must be in (0, 1], got {subset}")
    keep = min(n, max(2, int(-(-subset * n // 1))))  # ceil, at least one train and one validation sample
    train, val = split_indices(keep, (1 - valid_frac, valid_frac), seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))[:keep] if subset < 1 else None
    if order is not None:
        train, val = order[train], order[val]
    if max_per_task is not None:
        train = train[:max_per_task]
        val = val[: max(1, max_per_task // 4)] if len(val) else val
    return train, val


def _arrays(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return data["train_images"], data["train_labels"].long(), data["test_images"], data["test_labels"].long()


def _stats(images: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    sample = images[idx[:10000]].float() / 255.0
    return float(sample.mean()), float(sample.std())


def permuted_stream(data: dict[str, torch.Tensor], num_tasks: int, batch_size: int, seed: int = 0, name: str = "perm",
                    img_size: int = 32, channels: int = 3, valid_frac: float = 0.1,
                    max_per_task: int | None = None, subset: float = 1.0) -> list[TaskData]:
    """``num_tasks`` tasks over all classes; task ``t`` permutes the pixels of the (padded) image with its own
    permutation — task 0 too.  ``data``: ``train_images (N, H, W) uint8``, ``train_labels``, ``test_*``."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
    xtr, ytr, xte, yte = _arrays(data)
    train, val = _train_val(len(xtr), valid_frac, seed, max_per_task, subset)
    test = torch.arange(len(xte))
    mean, std = _stats(xtr, train)
    num_classes = int(ytr.max()) + 1
    gen = torch.Generator().manual_seed(seed + 1)
    tasks = []
    for t in range(num_tasks):
        tf = image_transform(img_size, channels, mean, std, torch.randperm(img_size * img_size, generator=gen))
        tasks.append(TaskData(
            name=f"{name}-{t}", num_classes=num_classes,
            train=BatchLoader(xtr, ytr, train, batch_size, True, tf),
            val=BatchLoader(xtr, ytr, val, 512, False, tf) if len(val) else None,
            test=BatchLoader(xte, yte, test, 512, False, tf),
        ))
    return tasks


def class_split_stream(data: dict[str, torch.Tensor], class_order: Sequence[Sequence[int]], batch_size: int,
                       seed: int = 0, name: str = "split", img_size: int = 32, channels: int = 3,
                       valid_frac: float = 0.1, max_per_task: int | None = None,
                       transform=None, subset: float = 1.0) -> list[TaskData]:
    """One task per group of ``class_order`` (explicit, e.g. ``[[0, 1], [2, 3], ...]``); labels are remapped to
    ``0..C−1`` within each task in the order given.  ``transform`` (default: grey images padded to ``img_size``
    and repeated to ``channels``) turns a uint8 batch into the model's input."""
    xtr, ytr, xte, yte = _arrays(data)
    n_classes = int(max(int(ytr.max()), int(yte.max()))) + 1
    flat = [c for group in class_order for c in group]
    if len(set(flat)) != len(flat) or any(not 0 <= c < n_classes for c in flat):
        raise ValueError(f"class_order must list distinct classes in [0, {n_classes}), got {class_order}")
    tf = transform
    if tf is None:
        tf = image_transform(img_size, channels, *_stats(xtr, torch.arange(len(xtr))))
    tasks = []
    for t, group in enumerate(class_order):
        label_map = torch.full((n_classes,), -1, dtype=torch.long)
        label_map[torch.tensor(list(group))] = torch.arange(len(group))
        in_train = (label_map[ytr] >= 0).nonzero().flatten()
        in_test = (label_map[yte] >= 0).nonzero().flatten()
        train_pos, val_pos = _train_val(len(in_train), valid_frac, seed + t, max_per_task, subset)
        tasks.append(TaskData(
            name=f"{name}-{t}", num_classes=len(group),
            train=BatchLoader(xtr, ytr, in_train[train_pos], batch_size, True, tf, label_map),
            val=BatchLoader(xtr, ytr, in_train[val_pos], 512, False, tf, label_map) if len(val_pos) else None,
            test=BatchLoader(xte, yte, in_test, 512, False, tf, label_map),
        ))
    return tasks
