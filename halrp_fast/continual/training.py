"""Mini-batch training and evaluation loops shared by every phase."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .config import HALRPConfig


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def make_optimizer(params: list[torch.nn.Parameter], cfg: HALRPConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def train(forward: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter], loader: Iterable,
          epochs: int, cfg: HALRPConfig, penalty: Callable[[], torch.Tensor] | None = None,
          modules: Iterable[torch.nn.Module] = (), desc: str = "train") -> list[float]:
    """Train ``params`` for ``epochs`` on ``CE(forward(x), y) + penalty()``; returns the mean loss per epoch.

    ``modules`` are put in train mode.  The learning rate decays by ``cfg.lr_decay`` per epoch, or per
    iteration with the paper's schedule.
    """
    if epochs == 0:
        return []
    for m in modules:
        m.train()
    opt = make_optimizer(params, cfg)
    per_iter = cfg.paper_schedule
    if per_iter:
        gamma = cfg.schedule_gamma(getattr(loader, "batch_size", None) or 1)
    else:
        gamma = cfg.lr_decay
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    losses = []
    for _ in _progress(range(epochs), cfg.progress, desc):
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(cfg.device), y.to(cfg.device)
            loss = F.cross_entropy(forward(x), y)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_iter:
                sched.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        if not per_iter:
            sched.step()
        losses.append(total / max(count, 1))
    return losses


@torch.no_grad()
def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: str = "cpu") -> float:
    """Top-1 accuracy in percent."""
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((forward(x).argmax(-1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("the evaluation loader yielded no sample")
    return 100.0 * correct / total
