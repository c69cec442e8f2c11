"""Task-aware modules and ``convert()``."""
from ._context import TaskContext, TaskSelection, select_tasks
from .batchnorm import TaskBatchNorm
from .heads import TaskHeads
from .model import TaskModel, convert
from .norm import TaskNorm
from .perturbed import PerturbedLayer, TaskConv2d, TaskLinear

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
