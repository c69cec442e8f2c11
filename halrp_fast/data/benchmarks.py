"""Named benchmarks: a task-stream builder plus the hyper-parameters that are its defaults."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .digits import permuted_digits
from .stream import TaskData


@dataclass
class Benchmark:
    """``build(batch_size, seed, max_per_task)`` → tasks; ``model`` and ``model_kwargs`` name the network;
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
    build=lambda batch_size, seed, max_per_task=None: permuted_digits(10, batch_size, seed,
                                                                       max_per_task=max_per_task),
    model="lenet",
    model_kwargs={"in_channels": 1, "img_size": 8, "num_classes": 10},
    batch_size=32,
    config=dict(epochs=12, lr=1e-3, lr_decay=0.95, approx_rate=0.9, upper_rank=100, est_rank_epochs=1, l1=1e-6,
                wd=1e-3, prune="mixAR_AllLayer", prune_value=(1e-5, 0.1), prune_bound_all_tasks=False),
))
