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
from .reparametrized import TaskReparametrized
from .subclasses import register_layer_subclass

__all__ = [
    "PerturbedLayer",
    "TaskBatchNorm",
    "TaskContext",
    "TaskConv2d",
    "TaskHeads",
    "TaskLinear",
    "TaskModel",
    "TaskNorm",
    "TaskReparametrized",
    "TaskSelection",
    "convert",
    "register_layer_subclass",
    "select_tasks",
]
