"""Parameter accounting: the paper's count and the bytes really stored per task."""
from __future__ import annotations

from ..nn import TaskModel

#: an entry of ``U`` or ``V`` counts as a parameter when its magnitude exceeds this (the authors' count)
NONZERO = 1e-8


def paper_parameter_count(model: TaskModel, dense: bool = False) -> dict[str, int]:
    """The paper's count, as the authors' code takes it: all parameters of the base, plus per task ``t ≥ 1``
    its ``r, s``, the entries of its ``U, V`` with ``|x| > 1e-8`` (with ``dense``: all entries at the allocated
    rank, before pruning), its normalisation (BatchNorm, LayerNorm, GroupNorm) affine parameters and its head.
    The task's own conv/linear biases are not counted (the authors' count leaves them out; :func:`stored_bytes`
    holds them).

    Returns ``{"base": n0, "task_1": n1, ..., "total": n0 + Σ n_t}``.  Lazily added tasks are read first
    (the nonzeros need the values).
    """
    model.ensure_loaded()
    counts = {"base": sum(p.numel() for p in model.task_parameters(0))}
    layers = model.perturbed_layers()
    for t in range(1, model.num_tasks):
        n = 0
        for name, p in model.named_task_parameters(t).items():
            leaf = name.rsplit(".", 2)[-2]
            if leaf == "task_bias":
                continue
            if leaf not in ("U", "V"):
                n += p.numel()
            elif not dense:
                n += int((p.detach().abs() > NONZERO).sum())
        if dense:
            n += sum(L.allocated_rank(t) * (L.out_features + L.in_features) for L in layers.values())
        counts[f"task_{t}"] = n
    counts["total"] = sum(counts.values())
    return counts


def stored_bytes(model: TaskModel) -> dict[str, int]:
    """Bytes of every tensor held in memory per task (parameters and buffers; a lazily added task that has
    not been read yet holds none)."""
    out = {}
    for t, tensors in model.split_state_dict().items():  # one split for all tasks
        out["base" if t == 0 else f"task_{t}"] = sum(v.numel() * v.element_size() for v in tensors.values()
                                                     if not v.is_meta)
    out["total"] = sum(out.values())
    return out
