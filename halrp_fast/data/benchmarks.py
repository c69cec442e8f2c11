"""Named benchmarks: a task-stream builder plus the hyper-parameters that are its defaults.

Every setting is the authors' (lijiaqi/HALRP ``scripts/*_HALRP.sh``), per benchmark and per network; benchmarks
that are not in the paper (``pdigits``, ``pfmnist``, ``split-fmnist``) take the paper's PMNIST settings.
``docs/FIDELITY.md`` lists them against the scripts.
"""
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
    ``config`` holds the :class:`~halrp_fast.continual.HALRPConfig` fields the benchmark sets (``n_tasks`` and
    ``valid_frac`` among them, for the paper's schedule), ``model_config[name]`` what differs for another network."""

    name: str
    description: str
    build: Callable[..., list[TaskData]]
    model: str
    model_kwargs: dict
    batch_size: int
    config: dict = field(default_factory=dict)
    model_config: dict[str, dict] = field(default_factory=dict)
    #: the task orders ``build(order=...)`` takes (the paper's A–E), or "" for a stream with one order
    orders: str = ""

    def config_for(self, model: str | None = None) -> dict:
        """The benchmark's settings for ``model`` (default: its own network)."""
        return {**self.config, **self.model_config.get(model or self.model, {})}


BENCHMARKS: dict[str, Benchmark] = {}


def register(b: Benchmark) -> Benchmark:
    BENCHMARKS[b.name] = b
    return b


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


# scripts/pmnist_LeNet_HALRP.sh: 12 epochs, batch 128, Adam 1e-3, wd 1e-3, l1 1e-6, approx 0.9, upper rank 100, one
# estimation epoch, mixAR_AllLayer (1e-5, 0.40) with the all-task bound, 20 % validation, 10 tasks.  These are
# HALRPConfig's defaults; the entries below name them so a benchmark's settings read in one place.
PAPER_PMNIST = dict(epochs=12, lr=1e-3, wd=1e-3, l1=1e-6, approx_rate=0.9, upper_rank=100, est_rank_epochs=1,
                    prune="mixAR_AllLayer", prune_value=(1e-5, 0.40), prune_bound_all_tasks=True,
                    paper_schedule=True, n_tasks=10, valid_frac=0.2)

register(Benchmark(
    name="pdigits",
    description="permuted 8×8 digits (scikit-learn, bundled): 10 tasks × 10 classes, LeNet, no download",
    build=lambda batch_size, seed, max_per_task=None, data_dir=None, subset=1.0: permuted_digits(
        10, batch_size, seed, max_per_task=max_per_task, subset=subset),
    model="lenet",
    model_kwargs={"in_channels": 1, "img_size": 8, "num_classes": 10},
    batch_size=128,
    config=dict(PAPER_PMNIST),
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


def _register_permuted_lenet(name: str, description: str, load) -> None:
    """A 10-task permuted stream of a 28×28 ten-class dataset (``load(data_dir)``) at 32×32×3 for the paper's
    LeNet, built and trained as the authors' PMNIST."""
    register(Benchmark(
        name=name, description=description,
        build=lambda batch_size, seed, max_per_task=None, data_dir=None, subset=1.0: permuted_stream(
            load(data_dir), 10, batch_size, seed, name=name, valid_frac=0.2, max_per_task=max_per_task,
            subset=subset),
        model="lenet", model_kwargs={"in_channels": 3, "img_size": 32, "num_classes": 10}, batch_size=128,
        config=dict(PAPER_PMNIST),
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
        valid_frac=0.2, max_per_task=max_per_task, subset=subset, drop_last=True),
    model="lenet", model_kwargs={"in_channels": 3, "img_size": 32, "num_classes": 2}, batch_size=128,
    config=dict(PAPER_PMNIST, n_tasks=5),
))


def _cifar100(data_dir: str | Path | None) -> dict:
    if data_dir is None:
        raise FileNotFoundError("CIFAR-100 needs --data-dir DIR holding the python pickles 'train' and 'test' "
                                "(cifar-100-python); nothing is downloaded.")
    return load_cifar100(data_dir)


# scripts/cifar100_{splits,super}100_LeNet_HALRP.sh: 20 epochs, batch 128, wd 1e-4, l1 1e-4, mixAR_AllLayer
# (1e-5, 0.80) with the all-task bound, 20 % validation; the rest as PMNIST.
PAPER_CIFAR = dict(PAPER_PMNIST, epochs=20, wd=1e-4, l1=1e-4, prune_value=(1e-5, 0.80))


def _register_cifar100(name: str, title: str, stream, tasks: int, classes: int) -> None:
    """A CIFAR-100 stream of ``tasks`` tasks of ``classes`` classes with the paper's LeNet settings."""
    register(Benchmark(
        name=name,
        description=f"{title}: {tasks} tasks × {classes} classes, LeNet, task orders A–E (--order), --data-dir "
                    f"required",
        build=lambda batch_size, seed, max_per_task=None, data_dir=None, order="A", subset=1.0: stream(
            _cifar100(data_dir), batch_size, seed, order, valid_frac=0.2, max_per_task=max_per_task, subset=subset),
        model="lenet", model_kwargs={"in_channels": 3, "img_size": 32, "num_classes": classes}, batch_size=128,
        config=dict(PAPER_CIFAR, n_tasks=tasks), orders="ABCDE",
    ))


_register_cifar100("cifar100-splits", "CIFAR-100 Splits", cifar100_splits, tasks=10, classes=10)
_register_cifar100("cifar100-superclass", "CIFAR-100 SuperClass", cifar100_superclass, tasks=20, classes=5)


def _need(data_dir, what: str):
    if data_dir is None:
        raise FileNotFoundError(f"this benchmark needs --data-dir DIR holding {what}; nothing is downloaded.")
    return data_dir


def _five(batch_size, seed, max_per_task=None, data_dir=None, subset=1.0):
    root = Path(_need(data_dir, "svhn/, cifar10/, mnist/, fashion_mnist/ and notmnist/"))
    fashion = None if (root / "fashion_mnist").exists() else _fashion_dir()
    return five_datasets(root, batch_size, seed, max_per_task, subset, fashion_dir=fashion)


# scripts/five_AlexNet_HALRP.sh: as PMNIST with wd 1e-4, 5 tasks; five_ResNet18_HALRP.sh: approx 0.95, upper rank
# 120, three estimation epochs.
register(Benchmark(
    name="five-datasets",
    description="5-Datasets: SVHN, CIFAR-10, MNIST, Fashion-MNIST, notMNIST as 5 tasks, 32×32×3, AlexNet "
                "(--model resnet18)",
    build=_five, model="alexnet", model_kwargs={"in_channels": 3, "img_size": 32, "num_classes": 10},
    batch_size=128, config=dict(PAPER_PMNIST, wd=1e-4, n_tasks=5),
    model_config={"resnet18": dict(approx_rate=0.95, upper_rank=120, est_rank_epochs=3)},
))

# scripts/tiny{20,40}_{AlexNet,ResNet18}_HALRP.sh: 50 epochs, batch 32, 10 % validation, and per network:
_PAPER_TINY = dict(PAPER_PMNIST, epochs=50, valid_frac=0.1)
_TINY = {
    20: (dict(lr=1e-3, wd=5e-4, l1=1e-5, est_rank_epochs=25), dict(lr=5e-4, wd=1e-4, l1=5e-4, est_rank_epochs=25)),
    40: (dict(lr=1e-3, wd=1e-4, l1=5e-4, est_rank_epochs=20), dict(lr=5e-4, wd=1e-4, l1=5e-4, est_rank_epochs=25)),
}

for _n, (_alexnet, _resnet) in _TINY.items():
    register(Benchmark(
        name=f"tinyimagenet-{_n}",
        description=f"TinyImageNet-200 split into {_n} tasks, 64×64, AlexNet (--model resnet18; tiny-imagenet-200 in "
                    f"--data-dir)",
        build=lambda batch_size, seed, max_per_task=None, data_dir=None, subset=1.0, _n=_n: tinyimagenet_stream(
            load_tinyimagenet(_need(data_dir, "tiny-imagenet-200/")), _n, batch_size, seed,
            max_per_task=max_per_task, subset=subset),
        model="alexnet", model_kwargs={"in_channels": 3, "img_size": 64, "num_classes": 200 // _n}, batch_size=32,
        config=dict(_PAPER_TINY, n_tasks=_n, **_alexnet), model_config={"resnet18": _resnet},
    ))
