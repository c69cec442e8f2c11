"""Rank estimation for a new task: scalings, discrepancies, spectra, importance, allocation, initialisation."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..linalg import discrepancy, fit_scalings
from ..nn import TaskModel
from ..nn.norm import PerTaskModules
from .allocation import allocate_adaptive, lowrank_init
from .distributed import DistContext
from .importance import empirical_fisher


@dataclass
class Estimate:
    """What the estimation step decided for one task."""

    ranks: dict[str, int]
    explained: dict[str, float]
    importance: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)


def free_model(model: TaskModel, t: int) -> nn.Module:
    """A plain copy of the base (weights, biases, BatchNorm) with task ``t``'s fresh head."""
    free = model.export_task(0)
    head = copy.deepcopy(model.heads.heads[t])
    parent_name, _, child = model.head_name.rpartition(".")
    parent = free.get_submodule(parent_name) if parent_name else free
    setattr(parent, child, head)
    for p in free.parameters():
        p.requires_grad_(True)
    return free


def kernel_areas(model: TaskModel) -> dict[str, int]:
    """``k_h·k_w`` of every conv layer, 1 for linear layers."""
    return {n: (L.weight.shape[2] * L.weight.shape[3] if L.weight.dim() == 4 else 1)
            for n, L in model.perturbed_layers().items()}


def estimate_and_initialise(model: TaskModel, t: int, free: nn.Module, importance_loader: Iterable,
                            approx_rate: float, upper_rank: int, rank_mode: str = "hessian",
                            device: str = "cpu", svd: str = "rsvd",
                            generator: torch.Generator | None = None, dist: DistContext | None = None,
                            scalings: str = "least_squares",
                            free_forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Estimate:
    """Fit task ``t`` of ``model`` to the trained ``free`` model.

    Per layer: scalings ``r, s`` (``scalings``: see :func:`~halrp_fast.linalg.fit_scalings`), discrepancy ``D``,
    its top singular values (``svd="rsvd"``:
    randomized, sketches grown until the allocation is exact; ``"exact"``: full SVDs); per layer importance
    (empirical Fisher of ``free`` on ``importance_loader``); global allocation; then ``r, s`` and
    ``U = U_k √Σ_k``, ``V = V_k √Σ_k`` go into task ``t``, and its biases, BatchNorm and head are taken
    from ``free``.  ``generator`` drives the randomized sketches (so they leave the global RNG alone); with an active
    ``dist`` the importance is reduced over the processes, and every process then takes the same decisions.
    ``free_forward``: ``free``'s forward another way for the importance pass (the learner's compiled pass).
    """
    layers = model.perturbed_layers()
    sources = model.plain_sources()
    seconds = {}
    tic = time.perf_counter()
    weights = {n: free.get_parameter(sources[n][0]) for n in layers}
    importance = empirical_fisher(free, weights, importance_loader, device, dist, free_forward)
    seconds["importance"] = time.perf_counter() - tic

    tic = time.perf_counter()
    fitted, mats = {}, {}
    for n, L in layers.items():
        W, Wf = L.weight.detach(), weights[n].detach()
        if L.plain_transposed:
            Wf = Wf.T
        groups = getattr(L, "groups", 1)
        r, s = fit_scalings(Wf, W, scalings, groups)
        fitted[n] = (r, s)
        mats[n] = discrepancy(Wf, W, r, s, groups)
    spectra, alloc = allocate_adaptive(mats, importance, kernel_areas(model), approx_rate, upper_rank, rank_mode,
                                       method=svd, generator=generator)
    seconds["svd_allocation"] = time.perf_counter() - tic

    with torch.no_grad():
        for n, L in layers.items():
            r, s = fitted[n]
            key = str(t)
            L.r[key].copy_(r)
            L.s[key].copy_(s)
            U, V = lowrank_init(spectra[n], alloc.ranks[n])
            L.set_rank(t, U, V)
            if L.bias is not None:
                L.task_bias[key].copy_(free.get_parameter(sources[n][1]))
        for n, m in model.task_modules().items():
            if isinstance(m, PerTaskModules):  # BatchNorm, LayerNorm, GroupNorm
                m.module_of(t).load_state_dict(free.get_submodule(n).state_dict())
        model.heads.heads[t].load_state_dict(free.get_submodule(model.head_name).state_dict())
    return Estimate(alloc.ranks, alloc.explained, importance, seconds)
