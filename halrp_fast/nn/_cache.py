"""A small LRU cache of tensors derived from parameters, invalidated when any source changes."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch


def tensor_key(tensors: Sequence[torch.Tensor | None]) -> tuple | None:
    """Identity of the current *values* of ``tensors``: object, storage, in-place version, shape.

    In-place updates (optimiser steps, ``load_state_dict``) bump ``_version``; ``.data =`` changes the storage
    (a new dtype or device is a new storage; ``Module.to()`` clears the owners' caches besides); a narrowing
    ``.data =`` keeps the storage but not the shape.  ``None`` when a tensor has no version counter (inference
    tensors): then the value is recomputed every time.
    """
    try:
        return tuple([None if t is None else (id(t), t.data_ptr(), t._version, t.shape) for t in tensors])
    except RuntimeError:
        return None


class DerivedCache:
    """``get(name, sources, build)`` returns ``build()``, reusing it while ``sources`` are unchanged.

    Built without autograd and outside inference mode, so the value can be reused anywhere no
    gradient w.r.t. the sources is needed.  Holds at most ``capacity`` entries (LRU).
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, tuple[tuple, torch.Tensor]] = OrderedDict()

    def get(self, name: Hashable, sources: Sequence[torch.Tensor | None], build: Callable[[], object]):
        key = tensor_key(sources)
        value = self.lookup(name, sources, key)
        if value is None:
            with torch.inference_mode(False), torch.no_grad():
                value = build()
            self.put(name, sources, value, key)
        return value

    def lookup(self, name: Hashable, sources: Sequence[torch.Tensor | None], key: tuple | None = None):
        """The value stored for ``name`` if ``sources`` are unchanged since, else ``None`` (``key``: their
        :func:`tensor_key` when the caller has it already)."""
        key = tensor_key(sources) if key is None else key
        hit = self._entries.get(name)
        if key is not None and hit is not None and hit[0] == key:
            self._entries.move_to_end(name)
            return hit[1]
        return None

    def put(self, name: Hashable, sources: Sequence[torch.Tensor | None], value, key: tuple | None = None) -> None:
        """Store ``value`` (built without autograd) for ``name`` and the current ``sources``."""
        key = tensor_key(sources) if key is None else key
        if key is not None and self.capacity > 0:
            self._entries[name] = (key, value)
            self._entries.move_to_end(name)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
