"""Continual-learning metrics on an accuracy matrix ``A[i, j]`` = accuracy on task j after training task i.

Entries above the diagonal (tasks not yet trained) are ignored; accuracies are in percent.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _matrix(acc) -> np.ndarray:
    A = np.asarray(acc, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square (T, T), got shape {A.shape}")
    return A


def average_accuracy(acc) -> float:
    """ACC: mean accuracy over all tasks after the last task (mean of the last row)."""
    return float(_matrix(acc)[-1].mean())


def backward_transfer(acc) -> float:
    """BWT (Lopez-Paz & Ranzato): mean over j < T−1 of ``A[T−1, j] − A[j, j]`` (0 for one task)."""
    A = _matrix(acc)
    T = A.shape[0]
    return float(np.mean([A[-1, j] - A[j, j] for j in range(T - 1)])) if T > 1 else 0.0


def forgetting(acc) -> float:
    """Average forgetting (Chaudhry et al.): mean over j < T−1 of ``max_{l<T−1} A[l, j] − A[T−1, j]``."""
    A = _matrix(acc)
    T = A.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([max(A[l, j] for l in range(j, T - 1)) - A[-1, j] for j in range(T - 1)]))


def final_accuracies(acc) -> list[float]:
    """Accuracy of every task after the last task (the last row)."""
    return [float(v) for v in _matrix(acc)[-1]]


def order_robustness(final_by_order: Mapping[str, Sequence[float]], orders: Mapping[str, Sequence[int]]) -> dict:
    """OPD per task identity, AOPD (mean) and MOPD (max) over several task orders.

    ``final_by_order[o][pos]`` is the final accuracy of the task trained at position ``pos`` in order ``o``;
    ``orders[o][pos]`` is that task's identity.  OPD of a task = max − min of its final accuracy over orders.
    """
    if set(final_by_order) != set(orders) or len(orders) < 2:
        raise ValueError("need the final accuracies and the task identities of the same ≥ 2 orders")
    per_task: dict[int, list[float]] = {}
    for o, accs in final_by_order.items():
        ids = list(orders[o])
        if len(ids) != len(accs) or len(set(ids)) != len(ids):
            raise ValueError(f"order {o!r}: {len(accs)} accuracies for task identities {ids}")
        for task, a in zip(ids, accs, strict=True):
            per_task.setdefault(int(task), []).append(float(a))
    counts = {len(v) for v in per_task.values()}
    if counts != {len(orders)}:
        raise ValueError("every order must contain the same task identities")
    opd = {t: max(v) - min(v) for t, v in sorted(per_task.items())}
    return {"OPD": opd, "AOPD": float(np.mean(list(opd.values()))), "MOPD": float(max(opd.values()))}


def summary(acc) -> dict:
    """ACC, BWT, forgetting and the final per-task accuracies of one run."""
    return {"ACC": average_accuracy(acc), "BWT": backward_transfer(acc), "forgetting": forgetting(acc),
            "final": final_accuracies(acc)}
