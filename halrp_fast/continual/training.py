"""Mini-batch training and evaluation loops shared by every phase."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .config import HALRPConfig
from .distributed import DistContext, all_reduce_sum_


def logits_of(out) -> torch.Tensor:
    """The class scores ``(N, C)`` of a model's output: the output itself, or the ``logits`` of a transformers
    ``ModelOutput`` (or the first element of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned a {type(out).__name__}, which holds no class scores (a tensor, an output "
                    f"with .logits, or a tuple whose first element is the scores)")


def shard(x: torch.Tensor, y: torch.Tensor, dist: DistContext | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This process's contiguous part of the global batch ``(x, y)`` and the global batch size."""
    n = len(x)
    if dist is None or not dist.active:
        return x, y, n
    if n < dist.world_size:
        raise ValueError(f"a batch of {n} samples cannot be split over {dist.world_size} processes: use batches of "
                         f"at least {dist.world_size}")
    return x.tensor_split(dist.world_size)[dist.rank], y.tensor_split(dist.world_size)[dist.rank], n


def batch_to(x: torch.Tensor, y: torch.Tensor, device, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's ``(x, y)`` on ``device``, floating-point inputs cast to ``dtype`` (``None``: as they come)."""
    x = x.to(device, dtype=dtype) if dtype is not None and x.is_floating_point() else x.to(device)
    return x, y.to(device)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str, refresh: bool = True) -> None:
        pass

    def set_postfix(self, refresh: bool = True, **values) -> None:
        pass

    def close(self) -> None:
        pass


def _batch_bar(enabled: bool, desc: str, total: int | None):
    """A bar over every batch of every epoch (loss, samples per second and the ETA shown), or one that shows
    nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, unit="batch", leave=False, dynamic_ncols=True)


#: ``on_epoch_end(epoch, mean loss, seconds, samples)`` of :func:`train` (epoch counted from 0)
EpochEnd = Callable[[int, float, float, int], None]


def make_optimizer(params: list[torch.nn.Parameter], cfg: HALRPConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def train(forward: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter], loader: Iterable,
          epochs: int, cfg: HALRPConfig, penalty: Callable[[], torch.Tensor] | None = None,
          modules: Iterable[torch.nn.Module] = (), desc: str = "train", dist: DistContext | None = None,
          num_classes: int | None = None, on_epoch_end: EpochEnd | None = None) -> list[float]:
    """Train ``params`` for ``epochs`` on ``CE(forward(x), y) + penalty()``; returns the mean loss per epoch.

    ``modules`` are put in train mode.  The learning rate decays by ``cfg.lr_decay`` per epoch, or per
    iteration with the paper's schedule (``γ`` from the loader's ``batch_size``, else from the size of its first
    batch).  Labels on the CPU are checked against ``num_classes``.  With an active ``dist``, every process takes
    its part of each global batch and ``forward`` is a DistributedDataParallel module: the local loss is scaled so
    that the averaged gradient is the global batch's.  With ``cfg.progress`` a bar follows every batch (loss,
    samples per second, ETA); ``on_epoch_end`` is called after each epoch.
    """
    if epochs == 0:
        return []
    for m in modules:
        m.train()
    opt = make_optimizer(params, cfg)
    per_iter = cfg.paper_schedule
    # the paper's γ depends on the batch size: the loader's, else that of its first batch
    batch_size = getattr(loader, "batch_size", None) if per_iter else None
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.schedule_gamma(batch_size) if batch_size else
                                                   cfg.lr_decay)
    losses = []
    world = dist.world_size if dist is not None else 1
    per_epoch = len(loader) if hasattr(loader, "__len__") else None
    bar = _batch_bar(cfg.progress and (dist is None or dist.is_main), desc, per_epoch and epochs * per_epoch)
    try:
        for epoch in range(epochs):
            bar.set_description(f"{desc} epoch {epoch + 1}/{epochs}", refresh=False)
            tic = time.perf_counter()
            total, count, batches = 0.0, 0, 0
            for x, y in loader:
                check_labels(y, num_classes, f"{desc}, epoch {epoch + 1}, batch {batches + 1}")
                x, y, n = shard(*batch_to(x, y, cfg.device, cfg.torch_dtype), dist)
                if per_iter and not batch_size:
                    batch_size = n
                    sched.gamma = cfg.schedule_gamma(n)
                try:
                    logits = logits_of(forward(x))
                except ValueError as exc:  # e.g. BatchNorm given a batch of one sample, an input of a wrong size
                    raise ValueError(f"{desc}, epoch {epoch + 1}, batch {batches + 1} ({n} samples): {exc}") \
                        from None
                ce = F.cross_entropy(logits, y, reduction="sum") * (world / n)
                loss = ce + penalty() if penalty is not None else ce
                value = _checked_loss(loss, dist, f"{desc}, epoch {epoch + 1}, batch {batches + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if per_iter:
                    sched.step()
                total += value * n / world
                count += n
                batches += 1
                bar.set_postfix(loss=f"{value:.4g}", samples_per_s=f"{count / (time.perf_counter() - tic):.0f}",
                                refresh=False)
                bar.update()
            if batches == 0:
                raise ValueError(f"{desc}, epoch {epoch + 1}: the training loader yielded no batch (an empty loader, "
                                 f"or a one-shot iterator that cannot be read again for another epoch)")
            if not per_iter:
                sched.step()
            losses.append(_global_mean(total, count, world, dist))
            if on_epoch_end is not None:
                on_epoch_end(epoch, losses[-1], time.perf_counter() - tic, count)
    finally:
        bar.close()
    return losses


def check_labels(y: torch.Tensor, num_classes: int | None, where: str) -> None:
    """Labels of a CPU batch within ``0..num_classes−1`` (a cross-entropy on CUDA would assert on the device)."""
    if num_classes is None or y.device.type != "cpu" or y.numel() == 0:
        return
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be integers, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{where}: labels must be in 0..{num_classes - 1} (the task has {num_classes} classes), "
                         f"got {lo if lo < 0 else hi}")


def _checked_loss(loss: torch.Tensor, dist: DistContext | None, where: str) -> float:
    """The loss as a float (one sync per step; with an active ``dist`` every process checks every process's loss,
    so all stop together), or a ValueError saying where it stopped being finite."""
    value = loss.detach()
    if dist is not None and dist.active:
        value = all_reduce_sum_(value.reshape(1).double().clone(), dist)[0]
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: the loss is {value}; non-finite inputs (NaN or inf in the data) or a learning rate "
                         f"that is too large stop training here")
    return float(loss.detach()) if dist is not None and dist.active else value


def _global_mean(total: float, count: int, world: int, dist: DistContext | None) -> float:
    """``total / count`` where every process holds ``total`` for its part and ``count`` for the whole."""
    if dist is None or not dist.active:
        return total / max(count, 1)
    t = torch.tensor([total], dtype=torch.float64, device=dist.device)
    all_reduce_sum_(t, dist)
    return float(t) / max(count, 1)


@torch.no_grad()
def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: str = "cpu",
             dist: DistContext | None = None, dtype: torch.dtype | None = None,
             num_classes: int | None = None) -> float:
    """Top-1 accuracy in percent (with an active ``dist``: each process scores its part of every batch);
    floating-point inputs are cast to ``dtype`` unless it is ``None``."""
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        check_labels(y, num_classes, f"evaluation batch {i + 1}")
        x, y, n = shard(*batch_to(x, y, device, dtype), dist)
        correct += int((logits_of(forward(x)).argmax(-1) == y).sum())
        total += n
    if dist is not None and dist.active:
        c = torch.tensor([correct], dtype=torch.int64, device=dist.device)
        correct = int(all_reduce_sum_(c, dist))
    if total == 0:
        raise ValueError("the evaluation loader yielded no sample")
    return 100.0 * correct / total
