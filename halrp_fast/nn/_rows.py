"""The rows of a mixed batch in a model's inputs and outputs: which tensors are per-row, and reordering them.

A :class:`~halrp_fast.nn.model.TaskModel` runs a mixed batch with its rows sorted by task; every per-row input (any
tensor, in positional or keyword inputs and nested in lists, tuples, dicts or transformers' ``ModelOutput``, whose
first dimension is the batch) is taken in that order, and every per-row output put back in batch order (both
dimensions of a pairwise output such as CLIP's ``logits_per_image``).  A cache of
attention keys and values (transformers' ``Cache`` classes: anything with ``reorder_cache(index)``) is reordered in
place, each object once.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ._context import take_rows

#: keyword inputs that are never per-row, whatever their first dimension (positions of the new tokens, head masks)
SHARED_INPUTS = frozenset({"cache_position", "head_mask", "decoder_head_mask", "cross_attn_head_mask"})
#: outputs (keys of a transformers ``ModelOutput``) with a row of the batch along both of their first two dimensions:
#: CLIP-style similarities of every image with every text
PAIRWISE_OUTPUTS = frozenset({"logits_per_image", "logits_per_text"})


def is_cache(obj) -> bool:
    """A key/value cache that reorders its rows in place (transformers' ``Cache``, ``EncoderDecoderCache``)."""
    return not isinstance(obj, torch.Tensor) and callable(getattr(obj, "reorder_cache", None))


def batch_size(inputs: tuple, kwargs: Mapping) -> int:
    """The number of rows: the first dimension of the first tensor among the positional inputs, else among the
    keyword inputs (in the order given, shared inputs left out).  Raises ``TypeError`` when no input is a tensor
    with a batch dimension."""
    for value in (*inputs, *(v for k, v in kwargs.items() if k not in SHARED_INPUTS)):
        for leaf in tree_flatten(value, is_leaf=is_cache)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
                return leaf.shape[0]
    raise TypeError("no input is a tensor with a batch dimension: pass the batch as a tensor (positional or keyword), "
                    "e.g. model(x, task_ids) or model(input_ids=ids, task_ids=t)")


class RowOrder:
    """Puts the per-row values of a batch of ``rows`` rows in the order ``index`` (``value[index]``); each cache
    object is reordered (in place) once, whether it comes in or goes out."""

    def __init__(self, index: torch.Tensor, rows: int) -> None:
        self.index = index
        self.rows = rows
        self.caches: dict[int, object] = {}  # id → cache reordered by this RowOrder

    def __call__(self, tree):
        out = tree_map(self._leaf, tree, is_leaf=is_cache)
        if isinstance(out, Mapping):
            for key in PAIRWISE_OUTPUTS & out.keys():
                value = out[key]
                if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == self.rows:
                    out[key] = value.index_select(1, self.index)
        return out

    def inputs(self, inputs: tuple, kwargs: Mapping) -> tuple[tuple, dict]:
        """Positional and keyword inputs reordered (shared keyword inputs as they are)."""
        return self(inputs), {k: v if k in SHARED_INPUTS else self(v) for k, v in kwargs.items()}

    def _leaf(self, value):
        if isinstance(value, torch.Tensor):
            return take_rows(value, self.index) if value.dim() >= 1 and value.shape[0] == self.rows else value
        if is_cache(value) and id(value) not in self.caches:
            self.caches[id(value)] = value
            value.reorder_cache(self.index)
        return value
