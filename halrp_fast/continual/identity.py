"""What defines a run, so that a resume never continues a different one.

A run is the stream (its tasks' names, classes, sizes and a fingerprint of their data), the network, every
:class:`~halrp_fast.continual.HALRPConfig` field that changes results, the caller's description (benchmark,
order, data seed, batch size, ...) and the library version.  The runner stores it in every checkpoint and, on
resume, compares it field by field.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import torch

from .._version import __version__
from .checkpoint import CheckpointError
from .config import HALRPConfig

#: config fields that change how a run executes but not its result (beyond floating-point summation order)
RESULT_NEUTRAL = frozenset({"device", "progress", "channels_last", "compile"})


class RunMismatch(CheckpointError):
    """A checkpoint belongs to another run; ``fields`` lists ``(name, stored, current)``."""

    def __init__(self, where: str, fields: list[tuple[str, object, object]]) -> None:
        self.fields = fields
        shown = "; ".join(f"{name} {_short(a)} ≠ {_short(b)}" for name, a, b in fields)
        super().__init__(f"{where} holds another run: {shown}",
                         f"continue it deliberately with allow_changes={[name for name, _, _ in fields]}")


class UnknownRunFields(ValueError):
    """``allow_changes`` names fields that no run has; ``unknown`` and ``fields`` list them and the real ones."""

    def __init__(self, unknown: list[str], fields: list[str]) -> None:
        self.unknown, self.fields = unknown, fields
        super().__init__(f"allow_changes names no field of a run: {unknown}; fields: {fields}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _update(h, value) -> None:
    h.update(repr(value).encode())


def _loader_fingerprint(h, loader) -> None:
    """Size and, for a loader that can be iterated again (not a one-shot iterator), its first batch."""
    if loader is None:
        _update(h, None)
        return
    size = getattr(loader, "dataset_size", None)
    if size is None and hasattr(loader, "dataset"):
        size = len(loader.dataset)
    if size is None and hasattr(loader, "__len__"):
        size = len(loader)
    _update(h, size)
    if not hasattr(loader, "__len__") or iter(loader) is loader:
        return
    for batch in loader:
        for part in batch if isinstance(batch, (tuple, list)) else (batch,):
            if isinstance(part, torch.Tensor):
                _update(h, (tuple(part.shape), str(part.dtype)))
                h.update(part.detach().cpu().contiguous().numpy().tobytes())
        break


def _sample_indices(loader):
    """The sample indices a loader draws from, where it exposes them (BatchLoader, a DataLoader over a Subset)."""
    indices = getattr(loader, "indices", None)
    if indices is None:
        indices = getattr(getattr(loader, "dataset", None), "indices", None)
    return None if indices is None else torch.as_tensor(indices)


def task_fingerprint(task) -> str:
    """sha256 over a task's name, classes, its training and validation loaders' sizes and sample indices (where
    they expose them) and its first test batch (test loaders are not shuffled, so this reads the same data
    whatever the random state)."""
    h = hashlib.sha256()
    _update(h, (task.name, task.num_classes))
    for loader in (task.train, task.val):
        size = getattr(loader, "dataset_size", None)
        _update(h, size if size is not None else (len(loader) if hasattr(loader, "__len__") else None))
        indices = _sample_indices(loader)
        if indices is not None:
            h.update(indices.numpy().tobytes())
    _loader_fingerprint(h, task.test)
    return h.hexdigest()


def run_identity(config: HALRPConfig, fingerprints: Sequence[str], model_spec: Mapping | None,
                 meta: Mapping | None) -> dict:
    """The fields that define a run (flat names, as :class:`RunMismatch` reports them); ``fingerprints``: those of
    the tasks learned so far (a run may be continued with more tasks, never with other ones)."""
    identity = {f"config.{k}": v for k, v in config.to_dict().items() if k not in RESULT_NEUTRAL}
    identity["stream"] = list(fingerprints)
    identity["model_spec"] = dict(model_spec) if model_spec else None
    identity["halrp_fast"] = __version__
    for key, value in (meta or {}).items():
        if key in ("benchmark", "model", "order", "data_seed", "batch_size", "base_weights"):
            identity[key] = value
    return identity


def compare(stored: Mapping, current: Mapping, allow: Iterable[str], where: str) -> None:
    """Raise :class:`RunMismatch` naming every field that differs and is not in ``allow``."""
    allow = set(allow)
    unknown = allow - set(stored) - set(current)
    if unknown:
        raise UnknownRunFields(sorted(unknown), sorted(set(stored) | set(current)))
    fields = [(k, stored.get(k), current.get(k)) for k in sorted(set(stored) | set(current))
              if k not in allow and _normal(stored.get(k)) != _normal(current.get(k))]
    if fields:
        raise RunMismatch(where, fields)


def _normal(value):
    """JSON round trip: tuples are stored as lists."""
    if isinstance(value, (tuple, list)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value
