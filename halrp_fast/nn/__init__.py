"""Task-aware modules and ``convert()``."""
from ._context import TaskContext, TaskSelection, select_tasks
from .batchnorm import TaskBatchNorm
from .conv import TaskConv2d
from .conversion import convert
from .heads import TaskHeads
from .linear import TaskLinear
from .model import TaskModel
from .norm import TaskNorm
from .perturbed import PerturbedLayer

__all__ = [
    "PerturbedLayer",
    "TaskBatchNorm",
    "TaskContext",
    "TaskConv2d",
    "TaskHeads",
    "TaskLinear",
    "TaskModel",
    "TaskNorm",
    "TaskSelection",
    "convert",
    "select_tasks",
]
