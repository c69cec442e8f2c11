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

from .._checks import check_number
from ..nn import TaskModel
from .accounting import paper_parameter_count

MODES = ("absolute", "relative", "relativeAllLayer", "relativeAllLayerAllTask", "mixAR", "mixAR_AllLayer",
         "mixAR_AllLayerAllTask")


def exact_quantile(values: torch.Tensor, q: float, extra_zeros: int = 0) -> torch.Tensor:
    """The ``q``-quantile of ``values`` ≥ 0 plus ``extra_zeros`` implicit zeros (any size, on the values'
    device), with numpy's linear interpolation."""
    flat = values.reshape(-1)
    n = flat.numel() + extra_zeros
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)

    def kth(i: int) -> torch.Tensor:  # i-th smallest (0-based) of zeros + values
        if i < extra_zeros:
            return flat.new_zeros(())
        return torch.kthvalue(flat, i - extra_zeros + 1).values

    v_lo = kth(lo)
    if hi == lo or pos == lo:
        return v_lo
    return v_lo + (kth(hi) - v_lo) * (pos - lo)


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
    if p is not None:
        check_number("prune rate", p, low=0, high=1)
    if a is not None:
        check_number("absolute prune threshold", a, low=0)
    return a, p


def growth(model: TaskModel, dense: bool = True) -> float:
    """Parameters added over the base, as a fraction of the base (``count / base − 1``)."""
    counts = paper_parameter_count(model, dense=dense)
    return counts["total"] / counts["base"] - 1


def _pair(layer, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.U[str(t)], layer.V[str(t)]


def _dropped_entries(layer, t: int) -> int:
    """Entries of ``U, V`` removed with dropped columns: they count as zeros in every quantile, so
    pruning a task again at the same rate removes nothing more."""
    return (layer.allocated_rank(t) - layer.rank(t)) * (layer.out_features + layer.in_features)


def prune(model: TaskModel, mode: str, value, bound_all_tasks: bool = False) -> PruneReport:
    """Prune the ``U, V`` of tasks ``1 .. num_tasks−1`` in place (see the module docstring)."""
    model.ensure_loaded()
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

    def threshold(members: list[tuple[int, str]]) -> float:
        thr = 0.0 if a is None else a
        if p is not None:
            mags = torch.cat([x.detach().abs().reshape(-1) for t, n in members for x in _pair(layers[n], t)])
            zeros = sum(_dropped_entries(layers[n], t) for t, n in members)
            if mags.numel() + zeros:
                thr = max(thr, float(exact_quantile(mags, p, zeros)))
        return thr

    thresholds: dict[tuple[int, str], float] = {}
    if mode.endswith("AllLayerAllTask"):
        thr = threshold([(t, n) for t in tasks for n in layers])
        thresholds = {(t, n): thr for t in tasks for n in layers}
    elif mode.endswith("AllLayer"):
        for t in tasks:
            thr = threshold([(t, n) for n in layers])
            thresholds.update({(t, n): thr for n in layers})
    else:
        for t in tasks:
            for n in layers:
                thresholds[(t, n)] = threshold([(t, n)])
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
    layer.set_rank(t, U.detach()[:, alive], V.detach()[:, alive], pruned=True)
    return int(alive.sum())
