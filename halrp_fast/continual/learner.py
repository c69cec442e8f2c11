"""The HALRP learner: the whole method on any converted model and any stream of task datasets."""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import TaskModel, convert
from ..nn.sync_batchnorm import synced_batchnorm
from . import checkpoint
from .accounting import paper_parameter_count, stored_bytes
from .callbacks import Callback
from .compiled import CompiledTasks
from .config import HALRPConfig
from .distributed import DistContext
from .estimation import estimate_and_initialise, free_model
from .pruning import growth, prune
from .training import accuracy, train


@dataclass
class TaskReport:
    """What happened while learning one task (JSON-serialisable through ``dataclasses.asdict``)."""

    task: int
    num_classes: int
    ranks: dict[str, int] = field(default_factory=dict)
    explained: dict[str, float] = field(default_factory=dict)
    importance: dict[str, float] = field(default_factory=dict)
    params_added: int = 0
    params_added_dense: int = 0
    bytes_added: int = 0
    growth: float = 0.0
    prune_rate: float | None = None
    prune_thresholds: dict[str, float] = field(default_factory=dict)
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)


#: where the base (the frozen network every task perturbs) comes from: see :class:`HALRPLearner`
BASES = ("learn", "given", "given_head")


class HALRPLearner:
    """Learns tasks one after another with Hessian-aware low-rank perturbations.

    ``learn_task(train, val, num_classes)`` learns the next task of the stream; ``evaluate(loader, task_id)`` gives
    accuracy in percent; ``save(dir)`` / ``HALRPLearner.load(dir)`` checkpoint; ``export_task(t)`` gives a plain model.

    ``base``: ``"learn"`` (the paper's protocol): the first task of the stream trains the whole network, which then
    stays frozen as the base of every later task.  ``"given"``: the model's weights as they are (a pretrained
    backbone) are the frozen base, and every task of the stream, the first included, is learned as a perturbation
    of it with its own head (model task ``t + 1`` holds stream task ``t``; the model's own head is not used).
    ``"given_head"``: the same base, and the first task of the stream is the model with its own head as it is (no
    training; its classes must match the head), later tasks perturbations.  With a given base no task of the stream
    trains the base, unlike the paper, where task 0's data shapes it.

    ``callbacks``: :class:`~halrp_fast.continual.callbacks.Callback` objects told of every task's start and end and
    of every training epoch (e.g. :class:`~halrp_fast.continual.callbacks.CSVLogger`); ``config.progress`` shows a
    bar over the batches of each phase.
    """

    def __init__(self, model: nn.Module, config: HALRPConfig | None = None, head: str = "last",
                 dist: DistContext | None = None, base: str = "learn", callbacks: Iterable[Callback] = ()) -> None:
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {base!r}")
        self.config = config or HALRPConfig()
        self.base = base
        #: told of every task's start and end and of every training epoch (:class:`~.callbacks.Callback`)
        self.callbacks = list(callbacks)
        if not isinstance(model, TaskModel):
            model = convert(model, head=head)
        self.layout = self.config.memory_format(any(L.weight.dim() == 4 for L in model.perturbed_layers().values()))
        self.model = model.to(self.config.device, dtype=self.config.torch_dtype, memory_format=self.layout)
        self.reports: list[TaskReport] = []
        #: with an active context, every phase runs data parallel: DistributedDataParallel on each process's part
        #: of every global batch, BatchNorm statistics and importance over all processes
        self.dist = dist
        if self.config.compile != "off" and self._parallel:
            raise ValueError("compile is not supported in data-parallel runs yet: use compile='off' there")
        self._compiled: CompiledTasks | None = None
        if base != "learn":
            self.model.freeze_task(0)

    @property
    def task_offset(self) -> int:
        """Model task of the stream's task 0 (1 with ``base="given"``: the model's task 0 is the given base)."""
        return 1 if self.base == "given" else 0

    @property
    def compiled(self) -> CompiledTasks | None:
        """The compiled passes (``config.compile`` not ``"off"``), built on first use and kept for every task."""
        if self.config.compile == "off":
            return None
        if self._compiled is None:
            self._compiled = CompiledTasks(self.model, self.config.compile)
        return self._compiled

    def _task_forward(self, t: int):
        """``x ↦ model(x, t)`` for training task ``t``: the compiled pass, or the model itself."""
        if self.compiled is not None:
            return self.compiled.forward(t)
        net = self._ddp(self.model)
        return lambda x: net(x, t)

    @property
    def _parallel(self) -> bool:
        return self.dist is not None and self.dist.active

    def _ddp(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DistributedDataParallel when running data parallel (its trainable parameters
        at this moment are the ones it synchronises)."""
        if not self._parallel:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = torch.device(self.dist.device)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    @property
    def num_learned(self) -> int:
        """Tasks learned so far (the next ``learn_task`` learns task ``num_learned``)."""
        return len(self.reports)

    # ------------------------------------------------------------------ learning
    def learn_task(self, train_loader: Iterable, val_loader: Iterable | None = None,
                   num_classes: int | None = None) -> TaskReport:
        """Learn the next task from ``train_loader`` (``(x, y)`` with labels ``0..num_classes−1``).

        ``val_loader`` (optional) drives the importance estimate and the reported validation accuracy.
        The two phases :meth:`train_task` and :meth:`finish_task` in one call.
        """
        t = self.num_learned
        for callback in self.callbacks:
            callback.on_task_start(t, num_classes)
        report = self.finish_task(self.train_task(t, train_loader, val_loader, num_classes), val_loader)
        for callback in self.callbacks:
            callback.on_task_end(t, report)
        return report

    def train_task(self, t: int, train_loader: Iterable, val_loader: Iterable | None = None,
                   num_classes: int | None = None) -> TaskReport:
        """First phase of learning task ``t``: the base (``t = 0``), or estimation and perturbation training;
        the task ends frozen, nothing is pruned and the report is not recorded yet.

        The model must hold tasks ``0..t−1`` (for task-parallel runs they may be lazy placeholders): task
        ``t``'s result depends only on the base, its data and ``(seed, t)``.
        """
        cfg, model = self.config, self.model
        m = t + self.task_offset  # the model's task
        if m >= 1 and model.num_tasks != m:
            raise ValueError(f"the model holds {model.num_tasks} tasks; task {t} needs exactly tasks 0..{t - 1}"
                             + (" and the given base" if self.task_offset else ""))
        torch.manual_seed(cfg.seed + 10007 * t)
        tic_all = time.perf_counter()
        if m == 0:
            if num_classes is not None and num_classes != model.num_classes[0]:
                raise ValueError(f"num_classes={num_classes} but the model's head has {model.num_classes[0]} "
                                 f"classes for task 0")
            if self.base == "given_head":
                report = TaskReport(task=0, num_classes=model.num_classes[0], seconds={"training": 0.0})
            elif model.num_tasks > 1 or not any(p.requires_grad for p in model.task_parameters(0)):
                raise ValueError("the model's base (task 0) is already learned (frozen); continue a saved run with "
                                 "HALRPLearner.load(dir), give this learner the earlier learner's reports, or take "
                                 "the model's weights as the base: HALRPLearner(model, config, base='given')")
            else:
                report = self._learn_base(train_loader, t)
        else:
            if num_classes is None:
                raise ValueError(f"num_classes is required for task {t}")
            report = self._learn_perturbation(m, train_loader, val_loader, num_classes, t)
            report.task = t
        model.freeze_task(m)
        report.seconds["total"] = time.perf_counter() - tic_all
        return report

    def finish_task(self, report: TaskReport, val_loader: Iterable | None = None) -> TaskReport:
        """Second phase: prune the perturbations of all tasks so far (tasks ≥ 1), measure the validation
        accuracy and the parameter growth, and record ``report`` (task ``report.task`` must be the next one)."""
        cfg, model, t = self.config, self.model, report.task
        if t != self.num_learned:
            raise ValueError(f"the learner has learned {self.num_learned} tasks; cannot finish task {t}")
        m = t + self.task_offset
        tic_all = time.perf_counter()
        if m >= 1 and cfg.prune is not None:
            tic = time.perf_counter()
            pr = prune(model, cfg.prune, cfg.prune_value, cfg.prune_bound_all_tasks)
            report.seconds["pruning"] = time.perf_counter() - tic
            report.prune_rate = pr.rate
            report.prune_thresholds = {n: thr for (task, n), thr in pr.thresholds.items() if task == m}
        if m >= 1:
            report.ranks = model.ranks(m)
        if val_loader is not None:
            report.val_accuracy = self._accuracy(val_loader, m)
        counts, dense, nbytes = paper_parameter_count(model), paper_parameter_count(model, dense=True), \
            stored_bytes(model)
        key = "base" if m == 0 else f"task_{m}"
        report.params_added, report.params_added_dense = counts[key], dense[key]
        report.bytes_added = nbytes[key]
        report.growth = counts["total"] / counts["base"] - 1
        report.seconds["total"] = report.seconds.get("total", 0.0) + time.perf_counter() - tic_all
        self.reports.append(report)
        return report

    def _epoch_end(self, task: int, phase: str):
        """``train``'s ``on_epoch_end`` telling every callback, or ``None`` without callbacks."""
        if not self.callbacks:
            return None

        def tell(epoch: int, loss: float, seconds: float, samples: int) -> None:
            for callback in self.callbacks:
                callback.on_epoch_end(task, phase, epoch, loss, seconds, samples)
        return tell

    def _learn_base(self, loader: Iterable, stream_task: int = 0) -> TaskReport:
        cfg, model = self.config, self.model
        layers = list(model.perturbed_layers().values())
        params = model.task_parameters(0)

        def penalty():
            return cfg.wd / 2 * sum(L.weight.pow(2).sum() for L in layers)

        tic = time.perf_counter()
        forward = self._task_forward(0)
        with synced_batchnorm(model, self._parallel):
            losses = train(forward, params, loader, cfg.epochs, cfg, penalty if cfg.wd else None,
                           modules=[model], desc="task 0", dist=self.dist, num_classes=model.num_classes[0],
                           on_epoch_end=self._epoch_end(stream_task, "base"))
        return TaskReport(task=0, num_classes=model.num_classes[0], train_loss=losses,
                          seconds={"training": time.perf_counter() - tic})

    def _learn_perturbation(self, t_expected: int, loader: Iterable, val_loader: Iterable | None,
                            num_classes: int, stream_task: int) -> TaskReport:
        cfg, model = self.config, self.model
        t = model.add_task(num_classes)
        assert t == t_expected, (t, t_expected)
        seconds = {}
        tic = time.perf_counter()
        free = free_model(model, t).to(cfg.device, memory_format=self.layout)
        free_forward = self._ddp(free) if self.compiled is None else self.compiled.free_forward(free)
        with synced_batchnorm(free, self._parallel):
            train(free_forward, list(free.parameters()), loader, cfg.est_rank_epochs, cfg, modules=[free],
                  desc=f"task {stream_task} (free model)", dist=self.dist, num_classes=num_classes,
                  on_epoch_end=self._epoch_end(stream_task, "free model"))
            seconds["free_training"] = time.perf_counter() - tic
            est = estimate_and_initialise(model, t, free, val_loader if val_loader is not None else loader,
                                          cfg.approx_rate, cfg.upper_rank, cfg.rank_mode, cfg.device, cfg.svd,
                                          generator=torch.Generator().manual_seed(cfg.seed + 7919 * t),
                                          dist=self.dist, scalings=cfg.scalings,
                                          free_forward=None if self.compiled is None else free_forward)
        seconds.update(est.seconds)
        del free
        layers = list(model.perturbed_layers().values())
        key = str(t)

        def penalty():
            reg_l1 = sum(L.U[key].abs().sum() + L.V[key].abs().sum() for L in layers)
            reg_l2 = sum(L.r[key].pow(2).sum() + L.s[key].pow(2).sum() + L.U[key].pow(2).sum()
                         + L.V[key].pow(2).sum() for L in layers)
            return cfg.l1 * reg_l1 + cfg.wd / 2 * reg_l2

        tic = time.perf_counter()
        forward = self._task_forward(t)
        with synced_batchnorm(model, self._parallel):
            losses = train(forward, model.task_parameters(t), loader, cfg.epochs - cfg.est_rank_epochs,
                           cfg, penalty if (cfg.l1 or cfg.wd) else None, modules=[model], desc=f"task {stream_task}",
                           dist=self.dist, num_classes=num_classes,
                           on_epoch_end=self._epoch_end(stream_task, "perturbation"))
        seconds["training"] = time.perf_counter() - tic
        return TaskReport(task=t, num_classes=num_classes, ranks=model.ranks(t), explained=est.explained,
                          importance=est.importance, train_loss=losses, seconds=seconds)

    # ------------------------------------------------------------------ use
    def evaluate(self, loader: Iterable, task_id: int) -> float:
        """Top-1 accuracy (percent) of task ``task_id`` on ``loader`` (eval mode, merged weights)."""
        if not 0 <= task_id < self.num_learned:
            raise ValueError(f"task {task_id} has not been learned (learned: 0..{self.num_learned - 1})")
        return self._accuracy(loader, task_id + self.task_offset)

    def _accuracy(self, loader: Iterable, task_id: int) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            if self.compiled is not None:
                with torch.no_grad():
                    forward = self.compiled.forward(task_id, grad=False)
            else:
                def forward(x):
                    return self.model(x, task_id)
            # serving(): the task's merged weights and stand-ins are prepared once for all the loader's batches
            with synced_batchnorm(self.model, self._parallel), self.model.serving():
                return accuracy(forward, loader, self.config.device, self.dist, self.config.torch_dtype,
                                self.model.num_classes[task_id])
        finally:
            self.model.train(was_training)

    def export_task(self, t: int) -> nn.Module:
        """A plain ``nn.Module`` computing task ``t`` with merged weights (eval mode)."""
        if not 0 <= t < self.num_learned:
            raise ValueError(f"task {t} has not been learned (learned: 0..{self.num_learned - 1})")
        return self.model.export_task(t + self.task_offset).eval()

    def parameter_growth(self) -> float:
        """Parameters added over the base (paper's count, nonzeros of U, V), as a fraction of the base."""
        return growth(self.model, dense=False)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> dict:
        """Write the model (one file per task), config and reports; returns the manifest."""
        spec = getattr(self.model.model, "_halrp_spec", None)
        state = {
            "config": self.config.to_dict(),
            "base": self.base,
            "model_spec": spec,
            "reports": [dataclasses.asdict(r) for r in self.reports],
            **(extra or {}),
        }
        return checkpoint.save_checkpoint(directory, self.model, state)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module | None = None,
             device: str | None = None, lazy: bool = False) -> HALRPLearner:
        """Restore a learner saved by :meth:`save`.

        ``model``: the architecture to load into (an unconverted model, or a freshly converted
        :class:`TaskModel`); not needed when the model came from :mod:`halrp_fast.models`.
        ``lazy=True`` reads a task's file only when the task is first used (see
        :func:`~halrp_fast.continual.checkpoint.load_into`).
        """
        manifest = checkpoint.read_manifest(directory)
        config = HALRPConfig.from_dict(manifest["config"])
        if device is not None:
            config.device = device
        if model is None:
            spec = manifest.get("model_spec")
            if not spec:
                raise checkpoint.CheckpointError(f"{directory} was saved from a user model: pass the architecture "
                                                 f"as HALRPLearner.load(dir, model=...)")
            from .. import models

            model = getattr(models, spec["name"])(**spec["kwargs"])
        if not isinstance(model, TaskModel):
            model = convert(model, head=manifest["head_name"])
        if model.num_tasks != 1:
            raise checkpoint.CheckpointError("load into a freshly converted model (with task 0 only)")
        model.to(dtype=config.torch_dtype)  # loading casts the saved values to the model's dtype
        checkpoint.load_into(model, directory, manifest, lazy=lazy)
        learner = cls(model, config, base=manifest.get("base", "learn"))
        learner.reports = [TaskReport(**r) for r in manifest.get("reports", [])]
        for t in range(learner.model.num_tasks):
            learner.model.freeze_task(t)
        learner.manifest = manifest
        return learner
