"""Task-aware modules and ``convert()``."""
from ._context import TaskContext, TaskSelection, select_tasks
from .batchnorm import TaskBatchNorm
from .heads import TaskHeads
from .model import TaskModel, convert
from .perturbed import PerturbedLayer, TaskConv2d, TaskLinear

__all__ = [
    "PerturbedLayer",
    "TaskBatchNorm",
    "TaskContext",
    "TaskConv2d",
    "TaskHeads",
    "TaskLinear",
    "TaskModel",
    "TaskSelection",
    "convert",
    "select_tasks",
]
