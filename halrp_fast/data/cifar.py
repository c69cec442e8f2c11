"""CIFAR-100 from the official python pickles, and the paper's task splits and task orders A–E."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import safe_pickle
from .builders import check_fractions, class_split_stream
from .stream import TaskData
from .transforms import color_transform

# Per-channel statistics of the CIFAR-100 training images (as in the paper's loaders).
CIFAR100_MEAN, CIFAR100_STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)

# Position p of order X trains split ORDERS[X][p]; the splits are the 10 blocks of 10 consecutive fine classes
# (cifar100-splits) or the 20 coarse classes (cifar100-superclass).
SPLIT_ORDERS = {
    "A": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    "B": [1, 7, 4, 5, 2, 0, 8, 6, 9, 3],
    "C": [7, 0, 5, 1, 8, 4, 3, 6, 2, 9],
    "D": [5, 8, 2, 9, 0, 4, 3, 7, 6, 1],
    "E": [2, 9, 5, 4, 8, 0, 6, 1, 3, 7],
}
SUPERCLASS_ORDERS = {
    "A": list(range(20)),
    "B": [15, 12, 5, 9, 7, 16, 18, 17, 1, 0, 3, 8, 11, 14, 10, 6, 2, 4, 13, 19],
    "C": [17, 1, 19, 18, 12, 7, 6, 0, 11, 15, 10, 5, 13, 3, 9, 16, 4, 14, 2, 8],
    "D": [11, 9, 6, 5, 12, 4, 0, 10, 13, 7, 14, 3, 15, 16, 8, 1, 2, 19, 18, 17],
    "E": [6, 14, 0, 11, 12, 17, 13, 4, 9, 1, 7, 19, 8, 10, 3, 15, 18, 5, 2, 16],
}


def _unpickle(path: Path) -> dict:
    d = safe_pickle.load(path, "CIFAR-100 pickle")
    if not isinstance(d, dict):
        raise ValueError(f"cannot read CIFAR-100 pickle {path}: it holds a {type(d).__name__}, not a dict")
    return d


def load_cifar100(directory: str | Path) -> dict[str, torch.Tensor]:
    """``train_images (50000, 3, 32, 32) uint8``, ``train_labels``, ``train_coarse``, and the same for ``test``,
    from the files ``train`` and ``test`` of the official ``cifar-100-python`` archive (in ``directory`` or in
    ``directory/cifar-100-python``)."""
    directory = Path(directory)
    for root in (directory, directory / "cifar-100-python"):
        if (root / "train").exists() and (root / "test").exists():
            break
    else:
        raise FileNotFoundError(
            f"CIFAR-100 not found in {directory}: expected the python pickles 'train' and 'test' of "
            f"cifar-100-python.tar.gz in {directory} or {directory / 'cifar-100-python'}; nothing is downloaded.")
    out = {}
    for split in ("train", "test"):
        d = _unpickle(root / split)
        for key in ("data", "fine_labels", "coarse_labels"):
            if key not in d:
                raise ValueError(f"{root / split} lacks the field {key!r}: not a CIFAR-100 python pickle")
        images = torch.as_tensor(d["data"], dtype=torch.uint8)
        if images.dim() != 2 or images.shape[1] != 3072:
            raise ValueError(f"{root / split}: data must be (N, 3072) uint8, got {tuple(images.shape)}")
        out[f"{split}_images"] = images.view(-1, 3, 32, 32)
        out[f"{split}_labels"] = torch.as_tensor(d["fine_labels"], dtype=torch.int64)
        out[f"{split}_coarse"] = torch.as_tensor(d["coarse_labels"], dtype=torch.int64)
    return out


def class_block_splits(labels: torch.Tensor, groups: list[list[int]], seed: int, valid_frac: float,
                       subset: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(train, validation)`` training-set indices per group, drawn as the authors' CIFAR-100 loader does.

    One numpy legacy generator seeded with ``seed`` shuffles, group after group in the groups' own order (not the
    task order, so a task's split is the same in every order A–E), the group's indices listed class by class; the
    first ``⌈subset·n⌉`` are kept and of those the first ``⌊valid_frac·n_kept⌋`` are the validation part.
    """
    rng = np.random.RandomState(seed)
    y = labels.numpy()
    out = []
    for classes in groups:
        idx = np.hstack([np.where(y == c)[0] for c in classes]).tolist()
        rng.shuffle(idx)
        idx = idx[: int(np.ceil(subset * len(idx)))]
        n_val = int(np.floor(valid_frac * len(idx)))
        out.append((torch.tensor(idx[n_val:], dtype=torch.long), torch.tensor(idx[:n_val], dtype=torch.long)))
    return out


def _ordered_stream(data: dict, groups: list[list[int]], orders: dict[str, list[int]], order: str, prefix: str,
                    batch_size: int, seed: int, valid_frac: float, max_per_task: int | None,
                    subset: float) -> list[TaskData]:
    """Tasks for ``groups`` trained in ``orders[order]`` (position p trains group ``orders[order][p]``), each
    named ``prefix`` + its group id so that results map back to task identity.  As the authors' loader: the
    split of :func:`class_block_splits`, training batches in that fixed order every epoch (no reshuffling)."""
    if order not in orders:
        raise ValueError(f"order must be one of {sorted(orders)}, got {order!r}")
    check_fractions(valid_frac, subset)
    ids = orders[order]
    splits = class_block_splits(data["train_labels"], groups, seed, valid_frac, subset)
    tasks = class_split_stream(data, [groups[i] for i in ids], batch_size, seed, name=prefix,
                               max_per_task=max_per_task, transform=color_transform(CIFAR100_MEAN, CIFAR100_STD),
                               splits=[splits[i] for i in ids], shuffle_train=False)
    for t, i in zip(tasks, ids, strict=True):
        t.name = f"{prefix}{i}"
    return tasks


def cifar100_splits(data: dict, batch_size: int, seed: int = 0, order: str = "A", valid_frac: float = 0.2,
                    max_per_task: int | None = None, subset: float = 1.0) -> list[TaskData]:
    """10 tasks × 10 classes (classes 10i … 10i+9 form split i), trained in task order ``order``."""
    groups = [list(range(10 * i, 10 * i + 10)) for i in range(10)]
    return _ordered_stream(data, groups, SPLIT_ORDERS, order, "cifar100-split", batch_size, seed, valid_frac,
                           max_per_task, subset)


def cifar100_superclass(data: dict, batch_size: int, seed: int = 0, order: str = "A", valid_frac: float = 0.2,
                        max_per_task: int | None = None, subset: float = 1.0) -> list[TaskData]:
    """20 tasks × 5 classes: one task per coarse class (its fine classes ascending), in task order ``order``."""
    coarse, fine = data["train_coarse"], data["train_labels"]
    groups = [sorted(set(fine[coarse == c].tolist())) for c in range(20)]
    return _ordered_stream(data, groups, SUPERCLASS_ORDERS, order, "cifar100-superclass", batch_size, seed,
                           valid_frac, max_per_task, subset)
