"""L1-style pruning of the low-rank perturbations ``U, V`` of all tasks so far.

Modes (``value``):

* ``absolute`` (``a``): zero every entry with ``|x| ≤ a``;
* ``relative`` / ``relativeAllLayer`` / ``relativeAllLayerAllTask`` (``p``): the threshold is the
  ``p``-quantile of ``|x|`` over one layer of one task / all layers of one task / all layers of all tasks;
* ``mixAR`` / ``mixAR_AllLayer`` / ``mixAR_AllLayerAllTask`` (``(a, p)``): the larger of both thresholds.

With ``bound_all_tasks`` the quantile rate becomes ``1 − (1−p)/inc`` where ``inc`` is the dense growth of
the whole model over the base (all tasks, :func:`growth`); while ``inc < 1 − p`` nothing is pruned.  The
kept perturbation entries then stay within ``(1 − p)`` × the base's parameter count.  Columns of ``U``/``V``
that become all-zero are dropped, so the stored rank shrinks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..nn import TaskModel
from .accounting import paper_parameter_count

MODES = ("absolute", "relative", "relativeAllLayer", "relativeAllLayerAllTask", "mixAR", "mixAR_AllLayer",
         "mixAR_AllLayerAllTask")


def exact_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile of ``values`` (any size, on its device), linear interpolation as numpy."""
    flat = values.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(flat, lo + 1).values
    if hi == lo or pos == lo:
        return v_lo
    v_hi = torch.kthvalue(flat, hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


@dataclass
class PruneReport:
    """``thresholds[(task, layer)]``, the quantile ``rate`` used (None: none), and the kept ranks."""

    mode: str
    rate: float | None
    skipped: bool = False
    thresholds: dict[tuple[int, str], float] = field(default_factory=dict)
    zeroed_fraction: dict[int, float] = field(default_factory=dict)
    ranks: dict[int, dict[str, int]] = field(default_factory=dict)


def parse_value(mode: str, value) -> tuple[float | None, float | None]:
    """``(absolute threshold, quantile rate)`` for ``mode``."""
    if mode not in MODES:
        raise ValueError(f"prune mode must be one of {MODES}, got {mode!r}")
    if mode.startswith("mixAR"):
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise ValueError(f"prune mode {mode} needs prune_value=(absolute, rate), got {value!r}")
        a, p = float(value[0]), float(value[1])
    else:
        v = value[0] if isinstance(value, (tuple, list)) and len(value) == 1 else value
        if isinstance(v, (tuple, list)):
            raise ValueError(f"prune mode {mode} needs one prune_value, got {value!r}")
        a, p = (float(v), None) if mode == "absolute" else (None, float(v))
    if p is not None and not 0 <= p <= 1:
        raise ValueError(f"prune rate must be in [0, 1], got {p}")
    if a is not None and a < 0:
        raise ValueError(f"absolute prune threshold must be ≥ 0, got {a}")
    return a, p


def growth(model: TaskModel, dense: bool = True) -> float:
    """Parameters added over the base, as a fraction of the base (``count / base − 1``)."""
    counts = paper_parameter_count(model, dense=dense)
    return counts["total"] / counts["base"] - 1


def _pair(layer, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.U[str(t)], layer.V[str(t)]


def prune(model: TaskModel, mode: str, value, bound_all_tasks: bool = False) -> PruneReport:
    """Prune the ``U, V`` of tasks ``1 .. num_tasks−1`` in place (see the module docstring)."""
    a, p = parse_value(mode, value)
    tasks = list(range(1, model.num_tasks))
    layers = model.perturbed_layers()
    if p is not None and bound_all_tasks:
        inc = growth(model, dense=True)
        if inc < 1 - p:
            return PruneReport(mode, None, skipped=True, ranks={t: model.ranks(t) for t in tasks})
        p = 1 - (1 - p) / inc
    report = PruneReport(mode, p)
    if not tasks or not layers:
        return report

    def magnitudes(pairs):
        return torch.cat([x.detach().abs().reshape(-1) for U, V in pairs for x in (U, V)])

    def threshold(pairs) -> float:
        thr = 0.0 if a is None else a
        if p is not None:
            mags = magnitudes(pairs)
            if mags.numel():
                thr = max(thr, float(exact_quantile(mags, p)))
        return thr

    thresholds: dict[tuple[int, str], float] = {}
    if mode.endswith("AllLayerAllTask"):
        thr = threshold([_pair(L, t) for t in tasks for L in layers.values()])
        thresholds = {(t, n): thr for t in tasks for n in layers}
    elif mode.endswith("AllLayer"):
        for t in tasks:
            thr = threshold([_pair(L, t) for L in layers.values()])
            thresholds.update({(t, n): thr for n in layers})
    else:
        for t in tasks:
            for n, L in layers.items():
                thresholds[(t, n)] = threshold([_pair(L, t)])
    report.thresholds = thresholds
    with torch.no_grad():
        for t in tasks:
            zeroed = total = 0
            for n, L in layers.items():
                U, V = _pair(L, t)
                thr = thresholds[(t, n)]
                keep_u, keep_v = U.abs() > thr, V.abs() > thr
                zeroed += int((~keep_u).sum() + (~keep_v).sum())
                total += U.numel() + V.numel()
                U.mul_(keep_u)
                V.mul_(keep_v)
                drop_empty_columns(L, t)
            report.zeroed_fraction[t] = zeroed / total if total else 0.0
            report.ranks[t] = model.ranks(t)
    return report


def drop_empty_columns(layer, t: int) -> int:
    """Remove rank-1 terms whose ``U`` or ``V`` column is all zero; returns the new rank."""
    U, V = _pair(layer, t)
    alive = (U != 0).any(0) & (V != 0).any(0)
    if bool(alive.all()):
        return U.shape[1]
    layer.set_rank(t, U.detach()[:, alive], V.detach()[:, alive])
    return int(alive.sum())
