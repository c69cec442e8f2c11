"""Task-stream builders over one labelled image dataset: permuted pixels, or classes split into tasks."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .stream import TaskData, split_indices
from .transforms import BatchLoader, image_transform, permuted_transform, resize_grey


def check_fractions(valid_frac: float, subset: float) -> None:
    """``valid_frac`` in [0, 1) and ``subset`` in (0, 1], else a ValueError naming the argument."""
    if not 0 <= valid_frac < 1:
        raise ValueError(f"valid_frac must be in [0, 1), got {valid_frac}")
    if not 0 < subset <= 1:
        raise ValueError(f"subset must be in (0, 1], got {subset}")


def _train_val(n: int, valid_frac: float, seed: int, max_per_task: int | None,
               subset: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled train / validation indices of ``n`` samples; ``subset`` keeps that fraction of them first (as the
    paper's train_size), ``max_per_task`` then caps the training part."""
    check_fractions(valid_frac, subset)
    keep = min(n, max(2, int(-(-subset * n // 1))))  # ceil, at least one train and one validation sample
    train, val = split_indices(keep, (1 - valid_frac, valid_frac), seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))[:keep] if subset < 1 else None
    if order is not None:
        train, val = order[train], order[val]
    return cap_split(train, val, max_per_task)


def cap_split(train: torch.Tensor, val: torch.Tensor, max_per_task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``max_per_task`` training and ``max(1, max_per_task // 4)`` validation samples."""
    if max_per_task is not None:
        train = train[:max_per_task]
        val = val[: max(1, max_per_task // 4)] if len(val) else val
    return train, val


def _arrays(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return data["train_images"], data["train_labels"].long(), data["test_images"], data["test_labels"].long()


def _stats(images: torch.Tensor, pad_to: int | None = None) -> tuple[float, float]:
    """Mean and std of the pixels of uint8 ``images (N, H, W)`` in [0, 1] (with ``pad_to``: of the images zero-padded
    to that size), rounded to four decimals as the published constants are (MNIST: 0.1307, 0.3081)."""
    x = images.double() / 255.0
    n_pix = x[0].numel()
    m1, m2 = float(x.mean()), float(x.pow(2).mean())
    if pad_to is not None and pad_to * pad_to > n_pix:
        m1, m2 = m1 * n_pix / pad_to**2, m2 * n_pix / pad_to**2
    return round(m1, 4), round(max(m2 - m1 * m1, 0.0) ** 0.5, 4)


def task_permutations(num_tasks: int, size: int, seed: int) -> list[torch.Tensor]:
    """The authors' PMNIST permutations: the task seeds ``0 … num_tasks−1`` shuffled by ``seed``, then task ``i``
    permutes the ``size`` values of an image by a shuffle seeded with ``100 · seeds[i] + i`` (numpy's legacy
    generator, as scikit-learn's ``shuffle`` uses it).  Task 0 is permuted too."""
    seeds = np.arange(num_tasks)
    np.random.RandomState(seed).shuffle(seeds)
    perms = []
    for i, s in enumerate(seeds):
        p = np.arange(size)
        np.random.RandomState(int(s) * 100 + i).shuffle(p)
        perms.append(torch.from_numpy(p))
    return perms


def permuted_stream(data: dict[str, torch.Tensor], num_tasks: int, batch_size: int, seed: int = 0, name: str = "perm",
                    img_size: int = 32, channels: int = 3, valid_frac: float = 0.2,
                    max_per_task: int | None = None, subset: float = 1.0) -> list[TaskData]:
    """``num_tasks`` tasks over all classes of a grey dataset, built as the authors' PMNIST.

    Every image is resized to ``img_size`` (PIL bilinear), scaled to [0, 1], standardised with the pixel mean/std
    of the training file, repeated to ``channels``, and its ``channels·img_size²`` values are permuted by task
    ``t``'s permutation (:func:`task_permutations`; task 0 too).  Validation: the first ``valid_frac`` of the
    training file, in file order; training batches are reshuffled every epoch and the last partial batch is dropped;
    validation and test batches have ``batch_size`` samples.  ``subset`` keeps that fraction of the training part
    and ``max_per_task`` caps it (a seeded random choice).  ``data``: ``train_images (N, H, W) uint8``,
    ``train_labels``, ``test_*``.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
    check_fractions(valid_frac, subset)
    xtr, ytr, xte, yte = _arrays(data)
    mean, std = _stats(xtr)
    xtr, xte = resize_grey(xtr, img_size), resize_grey(xte, img_size)
    n_val = int(valid_frac * len(xtr))
    val, train = torch.arange(n_val), torch.arange(n_val, len(xtr))
    if subset < 1 or max_per_task is not None:
        keep = max(1, int(-(-subset * len(train) // 1)))
        train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:keep]]
        train, val = cap_split(train, val, max_per_task)
    num_classes = int(ytr.max()) + 1
    tasks = []
    for t, perm in enumerate(task_permutations(num_tasks, channels * img_size * img_size, seed)):
        tf = permuted_transform(channels, mean, std, perm)
        tasks.append(TaskData(
            name=f"{name}-{t}", num_classes=num_classes,
            train=BatchLoader(xtr, ytr, train, batch_size, True, tf, drop_last=True),
            val=BatchLoader(xtr, ytr, val, batch_size, False, tf) if len(val) else None,
            test=BatchLoader(xte, yte, torch.arange(len(xte)), batch_size, False, tf),
        ))
    return tasks


def class_split_stream(data: dict[str, torch.Tensor], class_order: Sequence[Sequence[int]], batch_size: int,
                       seed: int = 0, name: str = "split", img_size: int = 32, channels: int = 3,
                       valid_frac: float = 0.1, max_per_task: int | None = None,
                       transform=None, subset: float = 1.0,
                       splits: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                       shuffle_train: bool = True, drop_last: bool = False) -> list[TaskData]:
    """One task per group of ``class_order`` (explicit, e.g. ``[[0, 1], [2, 3], ...]``); labels are remapped to
    ``0..C−1`` within each task in the order given.  ``transform`` (default: grey images padded to ``img_size``,
    standardised, repeated to ``channels``) turns a uint8 batch into the model's input.

    ``splits[t]`` = ``(train, validation)`` indices into the training images for task ``t``; by default a random
    split of the task's samples seeded by ``seed + t``.  ``shuffle_train`` reshuffles the training batches every epoch
    and ``drop_last`` drops a last partial one; validation and test batches have ``batch_size`` samples.
    """
    xtr, ytr, xte, yte = _arrays(data)
    n_classes = int(max(int(ytr.max()), int(yte.max()))) + 1
    flat = [c for group in class_order for c in group]
    if len(set(flat)) != len(flat) or any(not 0 <= c < n_classes for c in flat):
        raise ValueError(f"class_order must list distinct classes in [0, {n_classes}), got {class_order}")
    if splits is not None and len(splits) != len(class_order):
        raise ValueError(f"splits must hold one (train, validation) pair per task, got {len(splits)} for "
                         f"{len(class_order)} tasks")
    tf = transform
    if tf is None:
        tf = image_transform(img_size, channels, *_stats(xtr, pad_to=img_size))
    tasks = []
    for t, group in enumerate(class_order):
        label_map = torch.full((n_classes,), -1, dtype=torch.long)
        label_map[torch.tensor(list(group))] = torch.arange(len(group))
        in_test = (label_map[yte] >= 0).nonzero().flatten()
        if splits is None:
            in_train = (label_map[ytr] >= 0).nonzero().flatten()
            train_pos, val_pos = _train_val(len(in_train), valid_frac, seed + t, max_per_task, subset)
            train_idx, val_idx = in_train[train_pos], in_train[val_pos]
        else:
            train_idx, val_idx = cap_split(*splits[t], max_per_task)
        tasks.append(TaskData(
            name=f"{name}-{t}", num_classes=len(group),
            train=BatchLoader(xtr, ytr, train_idx, batch_size, shuffle_train, tf, label_map, drop_last),
            val=BatchLoader(xtr, ytr, val_idx, batch_size, False, tf, label_map) if len(val_idx) else None,
            test=BatchLoader(xte, yte, in_test, batch_size, False, tf, label_map),
        ))
    return tasks
