"""Named benchmarks: a task-stream builder plus the hyper-parameters that are its defaults."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .builders import class_split_stream, permuted_stream
from .cifar import cifar100_splits, cifar100_superclass, load_cifar100
from .digits import permuted_digits
from .idx import load_mnist_like
from .multi import five_datasets, load_tinyimagenet, tinyimagenet_stream
from .stream import TaskData

#: where Debian's package ``dataset-fashion-mnist`` installs the IDX files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Benchmark:
    """``build(batch_size, seed, max_per_task, data_dir)`` → tasks; ``model`` and ``model_kwargs`` name the network;
    ``config`` holds the :class:`~halrp_fast.continual.HALRPConfig` defaults of the benchmark."""

    name: str
    description: str
    build: Callable[..., list[TaskData]]
    model: str
    model_kwargs: dict
    batch_size: int
    config: dict = field(default_factory=dict)


BENCHMARKS: dict[str, Benchmark] = {}


def register(b: Benchmark) -> Benchmark:
    BENCHMARKS[b.name] = b
    return b


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


register(Benchmark(
    name="pdigits",
    description="permuted 8×8 digits (scikit-learn, bundled): 10 tasks × 10 classes, LeNet, no download",
    build=lambda batch_size, seed, max_per_task=None, data_dir=None, subset=1.0: permuted_digits(
        10, batch_size, seed, max_per_task=max_per_task, subset=subset),
    model="lenet",
    model_kwargs={"in_channels": 1, "img_size": 8, "num_classes": 10},
    batch_size=32,
    config=dict(epochs=12, lr=1e-3, lr_decay=0.95, approx_rate=0.9, upper_rank=100, est_rank_epochs=1, l1=1e-6,
                wd=1e-3, prune="mixAR_AllLayer", prune_value=(1e-5, 0.1), prune_bound_all_tasks=False),
))


def _fashion_dir(data_dir: str | Path | None = None) -> Path:
    return Path(data_dir or os.environ.get("HALRP_FAST_FASHION_MNIST", FASHION_MNIST_DIR))


def _fashion_mnist(data_dir: str | Path | None) -> dict:
    directory = _fashion_dir(data_dir)
    try:
        return load_mnist_like(directory, "Fashion-MNIST")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} On Debian/Ubuntu: apt-get install dataset-fashion-mnist, or pass "
                                f"--data-dir DIR.") from None


# The paper's PMNIST hyper-parameters (LeNet, 12 epochs, batch 128, Adam 1e-3, validation 20 %).
_PAPER_LENET = dict(epochs=12, lr=1e-3, approx_rate=0.9, upper_rank=100, est_rank_epochs=1, l1=1e-6, wd=1e-3,
                    prune="mixAR_AllLayer", prune_value=(1e-5, 0.40), prune_bound_all_tasks=True)


def _register_permuted_lenet(name: str, description: str, load) -> None:
    """A 10-task permuted stream of a 28×28 ten-class dataset (``load(data_dir)``) at 32×32×3 for the paper's
    LeNet with its PMNIST hyper-parameters."""
    register(Benchmark(
        name=name, description=description,
        build=lambda batch_size, seed, max_per_task=None, data_dir=None, subset=1.0: permuted_stream(
            load(data_dir), 10, batch_size, seed, name=name, valid_frac=0.2, max_per_task=max_per_task,
            subset=subset),
        model="lenet", model_kwargs={"in_channels": 3, "img_size": 32, "num_classes": 10}, batch_size=128,
        config=dict(_PAPER_LENET),
    ))


_register_permuted_lenet(
    "pfmnist", "permuted Fashion-MNIST: 10 tasks × 10 classes, 32×32×3, LeNet (Debian's dataset-fashion-mnist)",
    _fashion_mnist)


def _mnist(data_dir: str | Path | None) -> dict:
    if data_dir is None:
        raise FileNotFoundError("PMNIST needs --data-dir DIR holding the four MNIST IDX files (train-images-idx3-ubyte"
                                ", train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally "
                                ".gz); nothing is downloaded.")
    return load_mnist_like(data_dir, "MNIST")


_register_permuted_lenet(
    "pmnist", "permuted MNIST: 10 tasks × 10 classes, 32×32×3, LeNet (MNIST IDX files in --data-dir)", _mnist)


register(Benchmark(
    name="split-fmnist",
    description="split Fashion-MNIST: 5 tasks × 2 classes, 32×32×3, LeNet (Debian's dataset-fashion-mnist)",
    build=lambda batch_size, seed, max_per_task=None, data_dir=None, subset=1.0: class_split_stream(
        _fashion_mnist(data_dir), [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], batch_size, seed, name="split-fmnist",
        valid_frac=0.2, max_per_task=max_per_task, subset=subset),
    model="lenet", model_kwargs={"in_channels": 3, "img_size": 32, "num_classes": 2}, batch_size=128,
    config=dict(_PAPER_LENET),
))


def _cifar100(data_dir: str | Path | None) -> dict:
    if data_dir is None:
        raise FileNotFoundError("CIFAR-100 needs --data-dir DIR holding the python pickles 'train' and 'test' "
                                "(cifar-100-python); nothing is downloaded.")
    return load_cifar100(data_dir)


# The paper's CIFAR-100 settings (LeNet, per-iteration schedule, validation 10 %).
_PAPER_CIFAR = dict(_PAPER_LENET, paper_schedule=True, valid_frac=0.1)

def _register_cifar100(name: str, title: str, stream, tasks: int, classes: int) -> None:
    """A CIFAR-100 stream of ``tasks`` tasks of ``classes`` classes with the paper's LeNet settings."""
    register(Benchmark(
        name=name,
        description=f"{title}: {tasks} tasks × {classes} classes, LeNet, task orders A–E (--order), --data-dir "
                    f"required",
        build=lambda batch_size, seed, max_per_task=None, data_dir=None, order="A", subset=1.0: stream(
            _cifar100(data_dir), batch_size, seed, order, max_per_task=max_per_task, subset=subset),
        model="lenet", model_kwargs={"in_channels": 3, "img_size": 32, "num_classes": classes}, batch_size=32,
        config=dict(_PAPER_CIFAR, n_tasks=tasks),
    ))


_register_cifar100("cifar100-splits", "CIFAR-100 Splits", cifar100_splits, tasks=10, classes=10)
_register_cifar100("cifar100-superclass", "CIFAR-100 SuperClass", cifar100_superclass, tasks=20, classes=5)


def _need(data_dir, what: str):
    if data_dir is None:
        raise FileNotFoundError(f"this benchmark needs --data-dir DIR holding {what}; nothing is downloaded.")
    return data_dir


def _five(batch_size, seed, max_per_task=None, data_dir=None, subset=1.0):
    root = Path(_need(data_dir, "cifar10/, mnist/, svhn/, fashion_mnist/ and notmnist/"))
    fashion = None if (root / "fashion_mnist").exists() else _fashion_dir()
    return five_datasets(root, batch_size, seed, max_per_task, subset, fashion_dir=fashion)


# The paper's 5-Datasets (AlexNet) and TinyImageNet settings, from the authors' scripts.
_PAPER_FIVE = dict(_PAPER_LENET, wd=1e-4)
_PAPER_TINY = dict(_PAPER_LENET, epochs=50, wd=5e-4, l1=1e-5, est_rank_epochs=25)

register(Benchmark(
    name="five-datasets",
    description="5-Datasets: CIFAR-10, MNIST, SVHN, Fashion-MNIST, notMNIST as 5 tasks, 32×32×3, AlexNet",
    build=_five, model="alexnet", model_kwargs={"in_channels": 3, "img_size": 32, "num_classes": 10},
    batch_size=128, config=dict(_PAPER_FIVE),
))

for _n in (20, 40):
    register(Benchmark(
        name=f"tinyimagenet-{_n}",
        description=f"TinyImageNet-200 split into {_n} tasks, 64×64, AlexNet (tiny-imagenet-200 in --data-dir)",
        build=lambda batch_size, seed, max_per_task=None, data_dir=None, subset=1.0, _n=_n: tinyimagenet_stream(
            load_tinyimagenet(_need(data_dir, "tiny-imagenet-200/")), _n, batch_size, seed,
            max_per_task=max_per_task, subset=subset),
        model="alexnet", model_kwargs={"in_channels": 3, "img_size": 64, "num_classes": 200 // _n}, batch_size=32,
        config=dict(_PAPER_TINY),
    ))
