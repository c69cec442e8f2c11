"""Loaders of the other datasets of the paper (CIFAR-10, SVHN, notMNIST, TinyImageNet) and the streams built
on them: 5-Datasets (each dataset one task) and TinyImageNet split into 20 or 40 tasks."""
from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .builders import _train_val, class_split_stream
from .idx import load_mnist_like
from .stream import TaskData
from .transforms import BatchLoader, color_transform, image_transform


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
            with open(root / name, "rb") as f:
                d = pickle.load(f, encoding="latin1")
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
    ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (used as the test set); classes in
    ``wnids.txt`` order; images ``(N, 3, 64, 64)`` uint8."""
    directory = Path(directory)
    root = next((r for r in (directory, directory / "tiny-imagenet-200") if (r / "wnids.txt").exists()), None)
    if root is None:
        raise _missing("TinyImageNet", directory, "tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, "
                                                  "val/images/*.JPEG and val/val_annotations.txt")
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
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


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sample = images[:10000].float() / 255.0
    dims = (0, 2, 3)
    return tuple(sample.mean(dims).tolist()), tuple(sample.std(dims).tolist())


def multi_dataset_stream(datasets: Sequence[tuple[str, dict]], batch_size: int, seed: int = 0,
                         img_size: int = 32, valid_frac: float = 0.2, max_per_task: int | None = None,
                         subset: float = 1.0) -> list[TaskData]:
    """One task per ``(name, data)``: colour images ``(N, 3, H, W)`` are standardised per channel, grey images
    ``(N, H, W)`` padded (or resized) to ``img_size`` and made 3-channel."""
    tasks = []
    for t, (name, data) in enumerate(datasets):
        xtr, ytr = data["train_images"], data["train_labels"].long()
        xte, yte = data["test_images"], data["test_labels"].long()
        if xtr.dim() == 4:
            tf = color_transform(*_channel_stats(xtr))
            if xtr.shape[-1] != img_size:
                base = tf
                tf = lambda b, base=base: torch.nn.functional.interpolate(  # noqa: E731
                    base(b), size=(img_size, img_size), mode="bilinear", align_corners=False)
        else:
            sample = xtr[:10000].float() / 255.0
            tf = image_transform(img_size, 3, float(sample.mean()), float(sample.std()))
        train, val = _train_val(len(xtr), valid_frac, seed + t, max_per_task, subset)
        tasks.append(TaskData(
            name=name, num_classes=int(max(int(ytr.max()), int(yte.max()))) + 1,
            train=BatchLoader(xtr, ytr, train, batch_size, True, tf),
            val=BatchLoader(xtr, ytr, val, 512, False, tf) if len(val) else None,
            test=BatchLoader(xte, yte, torch.arange(len(xte)), 512, False, tf),
        ))
    return tasks


FIVE_DATASETS = ("cifar10", "mnist", "svhn", "fashion_mnist", "notmnist")


def five_datasets(data_dir: str | Path, batch_size: int, seed: int = 0, max_per_task: int | None = None,
                  subset: float = 1.0, fashion_dir: str | Path | None = None) -> list[TaskData]:
    """5-Datasets in the paper's order: CIFAR-10, MNIST, SVHN, Fashion-MNIST, notMNIST, from the subfolders
    ``cifar10/``, ``mnist/``, ``svhn/``, ``fashion_mnist/`` (or ``fashion_dir``) and ``notmnist/`` of
    ``data_dir``."""
    root = Path(data_dir)
    fashion = Path(fashion_dir) if fashion_dir is not None else root / "fashion_mnist"
    loaded = [
        ("cifar10", load_cifar10(root / "cifar10")),
        ("mnist", load_mnist_like(root / "mnist", "MNIST")),
        ("svhn", load_svhn(root / "svhn")),
        ("fashion_mnist", load_mnist_like(fashion, "Fashion-MNIST")),
        ("notmnist", load_notmnist(root / "notmnist")),
    ]
    return multi_dataset_stream(loaded, batch_size, seed, 32, 0.2, max_per_task, subset)


TINY_MEAN, TINY_STD = (0.480, 0.448, 0.398), (0.277, 0.269, 0.282)


def tinyimagenet_stream(data: dict, num_tasks: int, batch_size: int, seed: int = 0, valid_frac: float = 0.1,
                        max_per_task: int | None = None, subset: float = 1.0) -> list[TaskData]:
    """TinyImageNet's classes in ``wnids.txt`` order, split into ``num_tasks`` equal consecutive groups."""
    n = data.get("num_classes", int(data["train_labels"].max()) + 1)
    if n % num_tasks:
        raise ValueError(f"{n} classes do not split into {num_tasks} equal tasks")
    per = n // num_tasks
    groups = [list(range(i * per, (i + 1) * per)) for i in range(num_tasks)]
    return class_split_stream(data, groups, batch_size, seed, name=f"tiny{num_tasks}", valid_frac=valid_frac,
                              max_per_task=max_per_task, transform=color_transform(TINY_MEAN, TINY_STD),
                              subset=subset)
