"""Task streams: each task is a :class:`TaskData` with train / val / test loaders yielding ``(x, y)``."""
from .builders import class_split_stream, permuted_stream
from .digits import permuted_digits
from .idx import load_mnist_like, read_idx
from .stream import TaskData, make_loader, split_indices
from .transforms import BatchLoader, image_transform

__all__ = ["BatchLoader", "TaskData", "class_split_stream", "image_transform", "load_mnist_like", "make_loader",
           "permuted_digits", "permuted_stream", "read_idx", "split_indices"]
