"""A straightforward eager implementation of HALRP: the baseline of ``bench_end_to_end.py``.

The same method as :class:`halrp_fast.continual.HALRPLearner`, written the way one first writes it from the
paper: every perturbed layer runs three separate convs/matmuls (the scaled base, ``Vᵀ``, ``U``); the
least-squares scalings loop over rows and columns in Python; every layer's discrepancy gets a full SVD;
the global allocation and the pruning quantiles go through numpy.  ``tests/test_bench_baseline.py`` checks
that each piece computes what the library computes, so the benchmark compares two implementations of one
method.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class NaiveLayer(nn.Module):
    """A conv/linear layer with a frozen base ``W`` and, per task ``t ≥ 1``, ``r, s, U, V`` and a bias.

    Task ``t``: ``y = r ⊙ op(s ⊙ x, W) + op_U(op_V(x)) + b`` (conv: ``op_V`` is a conv whose kernel repeats
    ``Vᵀ`` at every position, ``op_U`` a 1×1 conv).
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear) -> None:
        super().__init__()
        self.base = layer
        for p in layer.parameters():
            p.requires_grad_(False)
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.tasks = nn.ModuleList([nn.Module()])  # task 0 is the base itself
        self.task = 0

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add_task(self) -> None:
        W = self.base.weight
        out_f, in_f = W.shape[:2]
        p = nn.Module()
        p.r = nn.Parameter(torch.ones(out_f))
        p.s = nn.Parameter(torch.ones(in_f))
        p.U = nn.Parameter(torch.zeros(out_f, 0))
        p.V = nn.Parameter(torch.zeros(in_f, 0))
        p.bias = None if self.base.bias is None else nn.Parameter(self.base.bias.detach().clone())
        self.tasks.append(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == 0:
            return self.base(x)
        p, W = self.tasks[self.task], self.base.weight
        if self.is_conv:
            geo = dict(stride=self.base.stride, padding=self.base.padding, dilation=self.base.dilation)
            y = F.conv2d(x * p.s[None, :, None, None], W, None, **geo) * p.r[None, :, None, None]
            if p.U.shape[1]:
                kernel_v = p.V.T[:, :, None, None].expand(-1, -1, *W.shape[2:])
                y = y + F.conv2d(F.conv2d(x, kernel_v, None, **geo), p.U[:, :, None, None])
            if p.bias is not None:
                y = y + p.bias[None, :, None, None]
            return y
        y = F.linear(x * p.s, W) * p.r
        if p.U.shape[1]:
            y = y + F.linear(F.linear(x, p.V.T), p.U)
        if p.bias is not None:
            y = y + p.bias
        return y


class PerTask(nn.Module):
    """One module per task (BatchNorm, head), chosen by ``self.task``."""

    def __init__(self, first: nn.Module) -> None:
        super().__init__()
        self.per_task = nn.ModuleList([first])
        self.task = 0

    def forward(self, x):
        return self.per_task[self.task](x)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# --------------------------------------------------------------------------------- the estimation pieces
def scalings_loop(W_free: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``W_free ≈ diag(r) W diag(s)``, one row (then one column) at a time."""
    Wf, Wb = W_free.detach().flatten(2) if W.dim() == 4 else W_free.detach(), \
        W.detach().flatten(2) if W.dim() == 4 else W.detach()
    out_f, in_f = Wb.shape[:2]
    r = torch.empty(out_f)
    for j in range(out_f):
        r[j] = (Wf[j] * Wb[j]).sum() / max(float((Wb[j] * Wb[j]).sum()), 1e-20)
    s = torch.empty(in_f)
    for i in range(in_f):
        col_f, col = Wf[:, i], Wb[:, i] * (r[:, None] if Wb.dim() == 3 else r)
        s[i] = (col * col_f).sum() / max(float((col * col).sum()), 1e-20)
    return r, s


def discrepancy_full(W_free: torch.Tensor, W: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    D = W_free.detach() - r.view(-1, *[1] * (W.dim() - 1)) * W.detach() * s.view(1, -1, *[1] * (W.dim() - 2))
    return D.mean((2, 3)) if D.dim() == 4 else D


def allocate_numpy(sigmas: dict[str, np.ndarray], importance: dict[str, float], areas: dict[str, int],
                   shapes: dict[str, tuple[int, int]], approx_rate: float, upper_rank: int) -> dict[str, int]:
    """The global Hessian-weighted allocation over full spectra."""
    names = list(sigmas)
    scores = np.concatenate([sigmas[n].astype(np.float64) ** 2 * areas[n] * importance[n] for n in names])
    owner = np.concatenate([np.full(len(sigmas[n]), i) for i, n in enumerate(names)])
    order = np.argsort(-scores, kind="stable")
    total = scores.sum()
    counts = np.zeros(len(names), dtype=np.int64)
    if total > 0:
        share = np.cumsum(scores[order]) / total
        above = np.nonzero(share > approx_rate)[0]
        keep = above[0] + 1 if len(above) else len(order)
        counts = np.bincount(owner[order[:keep]], minlength=len(names))
    return {n: int(min(max(counts[i], 1), upper_rank, *shapes[n])) for i, n in enumerate(names)}


def prune_threshold(mags: list[np.ndarray], rate: float, absolute: float) -> float:
    flat = np.concatenate([m.ravel() for m in mags])
    return max(absolute, float(np.percentile(flat, 100 * rate))) if flat.size else absolute


# --------------------------------------------------------------------------------- the learner
class NaiveHALRP:
    """The method on a plain model whose task 0 (the base) is already trained.

    ``plain``: the trained base (``TaskModel.export_task(0)``); ``head_name``: its classifier; ``cfg``: a
    :class:`~halrp_fast.continual.HALRPConfig` (Adam, per-epoch decay, ``mixAR_AllLayer`` pruning).
    """

    def __init__(self, plain: nn.Module, head_name: str, cfg) -> None:
        if cfg.prune not in (None, "mixAR_AllLayer"):
            raise ValueError(f"the baseline implements prune='mixAR_AllLayer' only, got {cfg.prune!r}")
        self.cfg, self.head_name = cfg, head_name
        self.plain = copy.deepcopy(plain).eval()
        self.net = copy.deepcopy(plain)
        self.layers: dict[str, NaiveLayer] = {}
        self.per_task: dict[str, PerTask] = {}
        for name, m in list(self.net.named_modules()):
            if name == head_name or isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.per_task[name] = PerTask(m)
                _replace(self.net, name, self.per_task[name])
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                self.layers[name] = NaiveLayer(m)
                _replace(self.net, name, self.layers[name])
        self.num_tasks = 1
        self.allocated: dict[int, dict[str, int]] = {}

    def set_task(self, t: int) -> None:
        for m in (*self.layers.values(), *self.per_task.values()):
            m.task = t

    def task_params(self, t: int) -> list[nn.Parameter]:
        params = [p for L in self.layers.values() for p in L.tasks[t].parameters()]
        return params + [p for m in self.per_task.values() for p in m.per_task[t].parameters()]

    def _train(self, model: nn.Module, params, loader, epochs: int, penalty=None) -> None:
        cfg = self.cfg
        model.train()
        opt = torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
        per_iter = cfg.paper_schedule
        gamma = cfg.schedule_gamma(getattr(loader, "batch_size", None) or 1) if per_iter else cfg.lr_decay
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
        for _ in range(epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                if penalty is not None:
                    loss = loss + penalty()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if per_iter:
                    sched.step()
            if not per_iter:
                sched.step()

    def learn_task(self, train, val, num_classes: int) -> dict[str, float]:
        """Learn the next task (≥ 1); returns the seconds of each phase."""
        cfg, t = self.cfg, self.num_tasks
        torch.manual_seed(cfg.seed + 10007 * t)
        seconds, tic = {}, time.perf_counter()
        base_head = self.per_task[self.head_name].per_task[0]
        head = nn.Linear(base_head.in_features, num_classes, bias=base_head.bias is not None)
        free = copy.deepcopy(self.plain)
        _replace(free, self.head_name, head)
        for p in free.parameters():
            p.requires_grad_(True)
        self._train(free, list(free.parameters()), train, cfg.est_rank_epochs)
        seconds["free_training"] = time.perf_counter() - tic

        tic = time.perf_counter()
        free.eval()
        names = list(self.layers)
        free_w = [free.get_submodule(n).weight for n in names]
        sums, batches = {n: 0.0 for n in names}, 0
        for x, y in val:
            grads = torch.autograd.grad(F.cross_entropy(free(x), y), free_w)
            for n, g in zip(names, grads, strict=True):
                sums[n] += float(g.double().pow(2).mean()) * len(x)
            batches += 1
        importance = {n: sums[n] / batches for n in names}
        seconds["importance"] = time.perf_counter() - tic

        tic = time.perf_counter()
        fits, sigmas, factors, areas, shapes = {}, {}, {}, {}, {}
        for n, W_f in zip(names, free_w, strict=True):
            W = self.layers[n].weight
            r, s = scalings_loop(W_f, W)
            D = discrepancy_full(W_f, W, r, s)
            U_, S_, Vh = torch.linalg.svd(D, full_matrices=False)
            fits[n], sigmas[n], factors[n] = (r, s), S_.numpy(), (U_, S_, Vh)
            areas[n] = W.shape[2] * W.shape[3] if W.dim() == 4 else 1
            shapes[n] = tuple(D.shape)
        ranks = allocate_numpy(sigmas, importance, areas, shapes, cfg.approx_rate, cfg.upper_rank)
        seconds["svd_allocation"] = time.perf_counter() - tic

        with torch.no_grad():
            for n in names:
                L = self.layers[n]
                L.add_task()
                p, (r, s), (U_, S_, Vh), k = L.tasks[t], fits[n], factors[n], ranks[n]
                p.r.copy_(r)
                p.s.copy_(s)
                root = S_[:k].sqrt()
                p.U = nn.Parameter(U_[:, :k] * root)
                p.V = nn.Parameter(Vh[:k].T * root)
                if p.bias is not None:
                    p.bias.copy_(free.get_submodule(n).bias)
            for n, m in self.per_task.items():
                m.per_task.append(copy.deepcopy(free.get_submodule(n)))
        self.num_tasks += 1
        self.allocated[t] = dict(ranks)
        self.set_task(t)
        mine = [L.tasks[t] for L in self.layers.values()]

        def penalty():
            l1 = sum(p.U.abs().sum() + p.V.abs().sum() for p in mine)
            l2 = sum(p.r.pow(2).sum() + p.s.pow(2).sum() + p.U.pow(2).sum() + p.V.pow(2).sum() for p in mine)
            return cfg.l1 * l1 + cfg.wd / 2 * l2

        tic = time.perf_counter()
        self._train(self.net, self.task_params(t), train, cfg.epochs - cfg.est_rank_epochs, penalty)
        for p in self.task_params(t):
            p.requires_grad_(False)
        seconds["training"] = time.perf_counter() - tic

        tic = time.perf_counter()
        if cfg.prune is not None:
            self.prune()
        seconds["pruning"] = time.perf_counter() - tic
        return seconds

    def dense_growth(self) -> float:
        base = sum(p.numel() for L in self.layers.values() for p in L.base.parameters())
        base += sum(p.numel() for m in self.per_task.values() for p in m.per_task[0].parameters())
        added = 0
        for t in range(1, self.num_tasks):
            for n, L in self.layers.items():
                p = L.tasks[t]
                added += p.r.numel() + p.s.numel()  # the paper's count leaves the task's biases out
                added += self.allocated[t][n] * (p.r.numel() + p.s.numel())
            added += sum(q.numel() for m in self.per_task.values() for q in m.per_task[t].parameters())
        return added / base

    def prune(self) -> None:
        """``mixAR_AllLayer`` with the all-task bound: per task, the larger of the absolute threshold and the
        quantile of |U|, |V| over all its layers (dropped columns count as zeros)."""
        absolute, rate = self.cfg.prune_value
        if self.cfg.prune_bound_all_tasks:
            inc = self.dense_growth()
            if inc < 1 - rate:
                return
            rate = 1 - (1 - rate) / inc
        with torch.no_grad():
            for t in range(1, self.num_tasks):
                mags = []
                for n, L in self.layers.items():
                    p = L.tasks[t]
                    mags += [p.U.abs().numpy(), p.V.abs().numpy()]
                    dropped = (self.allocated[t][n] - p.U.shape[1]) * (p.U.shape[0] + p.V.shape[0])
                    mags.append(np.zeros(dropped, dtype=np.float32))
                thr = prune_threshold(mags, rate, absolute)
                for L in self.layers.values():
                    p = L.tasks[t]
                    U, V = p.U * (p.U.abs() > thr), p.V * (p.V.abs() > thr)
                    alive = (U != 0).any(0) & (V != 0).any(0)
                    p.U = nn.Parameter(U[:, alive], requires_grad=False)
                    p.V = nn.Parameter(V[:, alive], requires_grad=False)

    @torch.no_grad()
    def evaluate(self, loader, t: int) -> float:
        self.set_task(t)
        self.net.eval()
        correct = total = 0
        for x, y in loader:
            correct += int((self.net(x).argmax(-1) == y).sum())
            total += len(y)
        return 100.0 * correct / total

    def ranks(self, t: int) -> dict[str, int]:
        return {n: L.tasks[t].U.shape[1] for n, L in self.layers.items()}
