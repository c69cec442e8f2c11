"""Task streams: each task is a :class:`TaskData` with train / val / test loaders yielding ``(x, y)``."""
from .digits import permuted_digits
from .stream import TaskData, make_loader, split_indices

__all__ = ["TaskData", "make_loader", "permuted_digits", "split_indices"]
