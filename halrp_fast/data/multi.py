"""Loaders of the other datasets of the paper (CIFAR-10, SVHN, notMNIST, TinyImageNet) and the streams built
on them: 5-Datasets (each dataset one task) and TinyImageNet split into 20 or 40 tasks."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import safe_pickle
from .builders import cap_split, check_fractions, class_split_stream
from .idx import load_mnist_like
from .stream import TaskData
from .transforms import BatchLoader, color_transform, image_transform, random_crop_flip


def _missing(dataset: str, directory: Path, layout: str) -> FileNotFoundError:
    return FileNotFoundError(f"{dataset} not found in {directory}: expected {layout}; nothing is downloaded.")


def load_cifar10(directory: str | Path) -> dict[str, torch.Tensor]:
    """CIFAR-10 from the python pickles ``data_batch_1..5`` and ``test_batch`` (in ``directory`` or
    ``directory/cifar-10-batches-py``)."""
    directory = Path(directory)
    root = next((r for r in (directory, directory / "cifar-10-batches-py") if (r / "test_batch").exists()), None)
    if root is None:
        raise _missing("CIFAR-10", directory, "the python pickles data_batch_1 … data_batch_5 and test_batch "
                                              "(cifar-10-batches-py)")
    out = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        xs, ys = [], []
        for name in names:
            d = safe_pickle.load(root / name, "CIFAR-10 pickle")
            if not isinstance(d, dict) or "data" not in d or "labels" not in d:
                raise ValueError(f"cannot read CIFAR-10 pickle {root / name}: expected a dict with 'data' and "
                                 f"'labels'")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(d["labels"])
        out[f"{split}_images"] = torch.from_numpy(np.concatenate(xs))
        out[f"{split}_labels"] = torch.tensor(ys, dtype=torch.int64)
    return out


def load_svhn(directory: str | Path) -> dict[str, torch.Tensor]:
    """SVHN from ``train_32x32.mat`` and ``test_32x32.mat`` (format 2; label 10 means digit 0)."""
    from scipy.io import loadmat

    directory = Path(directory)
    out = {}
    for split in ("train", "test"):
        path = directory / f"{split}_32x32.mat"
        if not path.exists():
            raise _missing("SVHN", directory, "train_32x32.mat and test_32x32.mat")
        mat = loadmat(path)
        out[f"{split}_images"] = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)))
        out[f"{split}_labels"] = torch.from_numpy(mat["y"].reshape(-1).astype(np.int64) % 10)
    return out


def _read_images(paths: Sequence[Path], mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert(mode)
            if size is not None and im.size != size:
                im = im.resize(size)
            arrays.append(np.asarray(im, dtype=np.uint8))
    return np.stack(arrays) if arrays else np.zeros((0, *(size or (0, 0))), dtype=np.uint8)


def load_notmnist(directory: str | Path) -> dict[str, torch.Tensor]:
    """notMNIST from image folders ``train/A … train/J`` and ``test/A … test/J`` (28×28 grey images)."""
    directory = Path(directory)
    letters = "ABCDEFGHIJ"
    out = {}
    for split in ("train", "test"):
        if not all((directory / split / c).is_dir() for c in letters):
            raise _missing("notMNIST", directory, "image folders train/A … train/J and test/A … test/J")
        paths, labels = [], []
        for i, c in enumerate(letters):
            files = sorted(p for p in (directory / split / c).iterdir() if p.suffix.lower() in (".png", ".jpg"))
            paths += files
            labels += [i] * len(files)
        out[f"{split}_images"] = torch.from_numpy(_read_images(paths, "L", (28, 28)))
        out[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    return out


def load_tinyimagenet(directory: str | Path) -> dict[str, torch.Tensor]:
    """TinyImageNet-200 in its standard layout: ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` and
    ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (used as the test set); classes in sorted wnid
    order (torchvision's ``ImageFolder``, as the authors' loader); images ``(N, 3, 64, 64)`` uint8."""
    directory = Path(directory)
    root = next((r for r in (directory, directory / "tiny-imagenet-200") if (r / "wnids.txt").exists()), None)
    if root is None:
        raise _missing("TinyImageNet", directory, "tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, "
                                                  "val/images/*.JPEG and val/val_annotations.txt")
    wnids = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for w in wnids:
        files = sorted((root / "train" / w / "images").glob("*.JPEG"))
        paths += files
        labels += [index[w]] * len(files)
    val_paths, val_labels = [], []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in index:
            val_paths.append(root / "val" / "images" / parts[0])
            val_labels.append(index[parts[1]])
    to_chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return {"train_images": to_chw(_read_images(paths, "RGB", (64, 64))),
            "train_labels": torch.tensor(labels, dtype=torch.int64),
            "test_images": to_chw(_read_images(val_paths, "RGB", (64, 64))),
            "test_labels": torch.tensor(val_labels, dtype=torch.int64), "num_classes": len(wnids)}


def seeded_val_split(n: int, valid_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)`` indices: ``range(n)`` shuffled by numpy's legacy generator seeded with ``seed`` (as
    scikit-learn's ``shuffle(..., random_state=seed)`` in the authors' 5-Datasets loader), the first
    ``⌊valid_frac·n⌋`` for validation."""
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    n_val = int(valid_frac * n)
    return torch.from_numpy(order[n_val:]), torch.from_numpy(order[:n_val])


def multi_dataset_stream(datasets: Sequence[tuple[str, dict, tuple]], batch_size: int, seed: int = 0,
                         img_size: int = 32, valid_frac: float = 0.2, max_per_task: int | None = None,
                         subset: float = 1.0) -> list[TaskData]:
    """One task per ``(name, data, (mean, std))``: colour images ``(N, 3, H, W)`` are standardised per channel,
    grey images ``(N, H, W)`` zero-padded (or resized) to ``img_size``, standardised and made 3-channel.  Validation:
    :func:`seeded_val_split`; ``subset`` keeps a seeded fraction of the training part and ``max_per_task`` caps it;
    training batches reshuffled every epoch, the last partial one dropped (as the authors' loader)."""
    check_fractions(valid_frac, subset)
    tasks = []
    for name, data, (mean, std) in datasets:
        xtr, ytr = data["train_images"], data["train_labels"].long()
        xte, yte = data["test_images"], data["test_labels"].long()
        if xtr.dim() == 4:
            tf = color_transform(mean, std)
            if xtr.shape[-1] != img_size:
                base = tf
                tf = lambda b, base=base: torch.nn.functional.interpolate(  # noqa: E731
                    base(b), size=(img_size, img_size), mode="bilinear", align_corners=False)
        else:
            tf = image_transform(img_size, 3, mean, std)
        train, val = seeded_val_split(len(xtr), valid_frac, seed)
        if subset < 1:
            train = train[: max(1, int(-(-subset * len(train) // 1)))]
        train, val = cap_split(train, val, max_per_task)
        tasks.append(TaskData(
            name=name, num_classes=int(max(int(ytr.max()), int(yte.max()))) + 1,
            train=BatchLoader(xtr, ytr, train, batch_size, True, tf, drop_last=True),
            val=BatchLoader(xtr, ytr, val, batch_size, False, tf) if len(val) else None,
            test=BatchLoader(xte, yte, torch.arange(len(xte)), batch_size, False, tf),
        ))
    return tasks


#: the authors' 5-Datasets normalisation: per-channel mean and std of each dataset in [0, 1] (the grey ones
#: padded to 32×32)
FIVE_STATS = {
    "cifar10": (tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7))),
    "mnist": (0.1, 0.2752),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)),
    "fashion_mnist": (0.2190, 0.3318),
    "notmnist": (0.4254, 0.4501),
}
#: the task order of the authors' 5-Datasets runs (their loader shuffles the five datasets with seed 0)
FIVE_DATASETS = ("svhn", "cifar10", "mnist", "fashion_mnist", "notmnist")


def five_datasets(data_dir: str | Path, batch_size: int, seed: int = 0, max_per_task: int | None = None,
                  subset: float = 1.0, fashion_dir: str | Path | None = None) -> list[TaskData]:
    """5-Datasets in the authors' order SVHN, CIFAR-10, MNIST, Fashion-MNIST, notMNIST, from the subfolders
    ``svhn/``, ``cifar10/``, ``mnist/``, ``fashion_mnist/`` (or ``fashion_dir``) and ``notmnist/`` of ``data_dir``;
    20 % of each training set for validation."""
    root = Path(data_dir)
    fashion = Path(fashion_dir) if fashion_dir is not None else root / "fashion_mnist"
    loaders = {
        "svhn": lambda: load_svhn(root / "svhn"),
        "cifar10": lambda: load_cifar10(root / "cifar10"),
        "mnist": lambda: load_mnist_like(root / "mnist", "MNIST"),
        "fashion_mnist": lambda: load_mnist_like(fashion, "Fashion-MNIST"),
        "notmnist": lambda: load_notmnist(root / "notmnist"),
    }
    loaded = [(name, loaders[name](), FIVE_STATS[name]) for name in FIVE_DATASETS]
    return multi_dataset_stream(loaded, batch_size, seed, 32, 0.2, max_per_task, subset)


#: the authors' TinyImageNet normalisation (ImageNet's statistics)
TINY_MEAN, TINY_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def per_class_val_split(labels: torch.Tensor, classes: Sequence[int], valid_frac: float,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)`` indices of ``classes``: of each class's samples, in a random order, the first
    ``⌊valid_frac·n_class⌋`` go to validation (the authors' TinyImageNet split)."""
    train, val = [], []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = int(len(idx) * valid_frac)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train), torch.cat(val)


def tinyimagenet_stream(data: dict, num_tasks: int, batch_size: int, seed: int = 0, valid_frac: float = 0.1,
                        max_per_task: int | None = None, subset: float = 1.0) -> list[TaskData]:
    """TinyImageNet's classes (sorted wnids) split into ``num_tasks`` equal consecutive groups, as the authors'
    loader: ``valid_frac`` of each class for validation, training images randomly cropped (padding 4) and flipped,
    ImageNet's normalisation; ``subset`` keeps a seeded fraction of each task's training part."""
    check_fractions(valid_frac, subset)
    n = data.get("num_classes", int(data["train_labels"].max()) + 1)
    if n % num_tasks:
        raise ValueError(f"{n} classes do not split into {num_tasks} equal tasks")
    per = n // num_tasks
    groups = [list(range(i * per, (i + 1) * per)) for i in range(num_tasks)]
    gen = torch.Generator().manual_seed(seed)
    splits = []
    for g in groups:
        train, val = per_class_val_split(data["train_labels"], g, valid_frac, gen)
        train = train[torch.randperm(len(train), generator=gen)]
        splits.append((train[: max(1, int(-(-subset * len(train) // 1)))], val))
    tasks = class_split_stream(data, groups, batch_size, seed, name=f"tiny{num_tasks}", max_per_task=max_per_task,
                               transform=color_transform(TINY_MEAN, TINY_STD), splits=splits)
    augment = random_crop_flip(color_transform(TINY_MEAN, TINY_STD))
    for t in tasks:
        t.train.transform = augment
    return tasks
