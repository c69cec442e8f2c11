"""Hyper-parameters of the HALRP learner."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .._checks import check_int, check_number
from ..linalg.scalings import SCALINGS
from .pruning import MODES, parse_value

#: ``HALRPConfig.compile`` values: off, or the ``torch.compile`` mode of the training and evaluation passes
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

#: ``--channels-last`` choices of the command line and benchmarks → :attr:`HALRPConfig.channels_last`
CHANNELS_LAST_CHOICES = {"auto": None, "on": True, "off": False}

#: :attr:`HALRPConfig.dtype` (and ``--dtype``) choices → the floating-point type of parameters and activations
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class HALRPConfig:
    """Everything that shapes a HALRP run.  The defaults are the paper's PMNIST settings (the authors'
    ``scripts/pmnist_LeNet_HALRP.sh``); ``docs/FIDELITY.md`` maps every field to the authors' code.

    Training: ``epochs`` per task (the ``est_rank_epochs`` of the free model count towards it for tasks
    ≥ 1), ``lr`` with Adam.  Schedule: with ``paper_schedule`` (default) the authors' per-iteration
    ``ExponentialLR`` with ``γ = 0.95^(batch / (schedule_data_size / n_tasks · train_frac · (1 − valid_frac)))``,
    restarted at ``lr`` in every phase (base, free model, perturbation); ``n_tasks``, ``train_frac`` and
    ``valid_frac`` only enter that formula (give the stream's).  Without it, a per-epoch multiplicative
    ``lr_decay``.  ``adam_eps``: the authors multiply every gradient by 10 before Adam's step (eps 1e-8), which is
    exactly Adam with eps 1e-9.  Loss of a task ≥ 1: ``CE + l1 Σ(|U|+|V|) + wd/2 Σ(r²+s²+U²+V²)``;
    task 0: ``CE + wd/2 Σ‖W‖²`` over the linear/conv weights (not the head); the free model: ``CE``.

    Scalings: ``r`` then ``s`` fitted to the free model (``scalings="least_squares"``, the column fit given ``r``;
    ``"authors"`` reproduces the authors' code, whose column fit broadcasts ``r`` into a global factor: see
    :func:`~halrp_fast.linalg.fit_scalings`).

    Ranks: ``rank_mode="hessian"`` keeps the shortest prefix of all layers' importance-weighted
    singular values explaining more than ``approx_rate``, clamped to ``[1, upper_rank]``; ``"flat"``
    gives every layer ``upper_rank``; ``svd`` picks randomized (grown until the allocation is exact) or full
    exact SVDs of the discrepancies.  Pruning after each task: ``prune`` (one of
    :data:`~halrp_fast.continual.pruning.MODES` or None) with ``prune_value`` and the all-task bound.

    ``channels_last``: keep the conv weights (and with them every 4-D activation: convolutions,
    BatchNorm, pooling) in the channels-last layout; ``None`` = on for CPU runs of networks with
    convolutions, where oneDNN's channels-last kernels are faster, off on other devices.  Results are
    the same up to floating-point summation order.

    ``compile``: ``"off"`` (default), or the ``torch.compile`` mode (``"default"``; ``"reduce-overhead"``: CUDA graphs
    on CUDA, re-recorded per distinct shape; ``"max-autotune"``: tuned kernels, and CUDA graphs) in which the training
    passes (base, free model, perturbation), the importance pass and evaluation run through one compiled graph per
    structure, reused by every task (:mod:`halrp_fast.continual.compiled`); results equal the eager run up to
    floating-point summation order.  Not with data-parallel runs.

    ``dtype``: ``"float32"`` (default) or ``"float64"`` for every parameter, buffer and input batch.  Float64
    runs are slower and serve checks: runs that should agree up to summation order (data parallel against one
    process, one layout against another) then stay ~1e-12 apart, so discrete decisions taken on the way
    (max-pool winners, rank allocations) come out the same, where float32 rounding can tip near-ties.
    """

    epochs: int = 12
    lr: float = 1e-3
    lr_decay: float = 1.0
    optimizer: str = "adam"
    adam_eps: float = 1e-9
    momentum: float = 0.9
    paper_schedule: bool = True
    schedule_data_size: int = 50000
    n_tasks: int | None = 10
    train_frac: float = 1.0
    valid_frac: float = 0.2
    scalings: str = "least_squares"
    approx_rate: float = 0.9
    upper_rank: int = 100
    rank_mode: str = "hessian"
    svd: str = "rsvd"
    est_rank_epochs: int = 1
    l1: float = 1e-6
    wd: float = 1e-3
    prune: str | None = "mixAR_AllLayer"
    prune_value: float | tuple[float, float] = (1e-5, 0.40)
    prune_bound_all_tasks: bool = True
    seed: int = 0
    device: str = "cpu"
    channels_last: bool | None = None
    dtype: str = "float32"
    progress: bool = False
    compile: str = "off"

    def __post_init__(self) -> None:
        if isinstance(self.prune_value, list):
            self.prune_value = tuple(self.prune_value)
        for name in ("paper_schedule", "prune_bound_all_tasks", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_int("epochs", self.epochs, low=1)
        check_int("est_rank_epochs", self.est_rank_epochs, low=0)
        check_int("upper_rank", self.upper_rank, low=1)
        check_int("seed", self.seed, low=0, high=2**32 - 1)
        if self.n_tasks is not None:
            check_int("n_tasks", self.n_tasks, low=1)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("lr_decay", self.lr_decay, low=0, low_open=True)
        check_number("adam_eps", self.adam_eps, low=0, low_open=True)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("schedule_data_size", self.schedule_data_size, low=0, low_open=True)
        check_number("train_frac", self.train_frac, low=0, high=1, low_open=True)
        check_number("valid_frac", self.valid_frac, low=0, high=1, high_open=True)
        check_number("approx_rate", self.approx_rate, low=0, high=1, low_open=True)
        check_number("l1", self.l1, low=0)
        check_number("wd", self.wd, low=0)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.scalings not in SCALINGS:
            raise ValueError(f"scalings must be one of {SCALINGS}, got {self.scalings!r}")
        if self.svd not in ("rsvd", "exact"):
            raise ValueError(f"svd must be 'rsvd' or 'exact', got {self.svd!r}")
        if self.rank_mode not in ("hessian", "flat"):
            raise ValueError(f"rank_mode must be 'hessian' or 'flat', got {self.rank_mode!r}")
        if self.prune is not None:
            if self.prune not in MODES:
                raise ValueError(f"prune must be None or one of {MODES}, got {self.prune!r}")
            parse_value(self.prune, self.prune_value)
        if self.channels_last not in (None, True, False):
            raise TypeError(f"channels_last must be None (auto), True or False, got {self.channels_last!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {self.device!r}")
        if self.paper_schedule and not self.n_tasks:
            raise ValueError("paper_schedule needs n_tasks (the number of tasks of the stream)")
        self._check_phases()

    def _check_phases(self) -> None:
        """Settings under which a phase of learning a task would do nothing, or a field would be ignored: errors naming
        the fields."""
        if self.est_rank_epochs == 0:
            raise ValueError("est_rank_epochs=0 leaves the free model untrained: the rank estimation would see no "
                             "discrepancy and U, V would start (and stay) at zero; give est_rank_epochs ≥ 1")
        if self.epochs <= self.est_rank_epochs:
            raise ValueError(f"epochs={self.epochs} leaves no epoch to train the perturbation of a task ≥ 1 after the "
                             f"est_rank_epochs={self.est_rank_epochs} of its free model (they count towards epochs): "
                             f"give epochs > est_rank_epochs")
        if self.paper_schedule and self.lr_decay != 1.0:
            raise ValueError(f"lr_decay={self.lr_decay} is a per-epoch decay, which paper_schedule=True replaces by "
                             f"the paper's per-iteration schedule: set paper_schedule=False to use it (CLI: --schedule "
                             f"epoch)")

    @property
    def torch_dtype(self) -> torch.dtype:
        """:attr:`dtype` as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    def memory_format(self, has_conv: bool) -> torch.memory_format:
        """The layout of the conv weights for a network with (``has_conv``) or without convolutions."""
        on = self.channels_last
        if on is None:
            on = has_conv and torch.device(self.device).type == "cpu"
        return torch.channels_last if on and has_conv else torch.preserve_format

    def schedule_gamma(self, batch_size: int) -> float:
        """Per-iteration decay of the paper's schedule for batches of ``batch_size``."""
        per_task = self.schedule_data_size / self.n_tasks * self.train_frac * (1 - self.valid_frac)
        return 0.95 ** (batch_size / per_task)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["prune_value"], tuple):
            d["prune_value"] = list(d["prune_value"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HALRPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown HALRPConfig fields: {sorted(unknown)}")
        return cls(**d)
