"""``convert(model)``: replace every convertible layer of any PyTorch model by its task-aware form and wrap the
result in a :class:`~halrp_fast.nn.model.TaskModel`."""
from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from ._context import TaskContext, TaskModule, outermost
from .batchnorm import TaskBatchNorm
from .conv import TaskConv2d
from .heads import TaskHeads
from .linear import TaskConv1D, TaskLinear, is_conv1d
from .model import TaskModel, _set_submodule
from .norm import TaskNorm, is_sample_norm
from .reparametrized import fast_paths_off, projection_modules, reparametrized_wrapper, sequence_first_layers
from .subclasses import OWN_FORWARD, conversion_of, own_forward_wrapper

_log = logging.getLogger("halrp_fast")
_LAZY = (nn.LazyLinear, nn.LazyConv2d, nn.LazyBatchNorm1d, nn.LazyBatchNorm2d)


def _find_head(model: nn.Module, head: str) -> str:
    if head == "last":
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("head='last' found no nn.Linear in the model; name the classifier module with head=")
        return linears[-1]
    try:
        model.get_submodule(head)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"head={head!r} names no submodule of the model; submodules: {names[:50]}") from None
    return head


_UNSUPPORTED_PROJECTIONS = (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd, nn.Bilinear)


def _is_unsupported_projection(m: nn.Module) -> bool:
    """A layer whose weight maps inputs to outputs as a Linear or Conv2d does, but which convert cannot perturb
    (other convolutions). Left shared silently, it would look converted and adapt nothing."""
    return isinstance(m, _UNSUPPORTED_PROJECTIONS)


def convert(model: nn.Module, head: str = "last", *, inplace: bool = False,
            exclude: Iterable[str] = (), head_factory: Callable[[int], nn.Module] | None = None,
            grouped_mixed_batches: bool | None = None, example_input=None) -> TaskModel:
    """Make ``model`` task-aware and return a :class:`TaskModel` with one task (task 0 = the model).

    Every ``nn.Linear``, ``nn.Conv2d`` (grouped and depthwise included) and transformers ``Conv1D`` becomes
    :class:`TaskLinear`/:class:`TaskConv2d`/:class:`~halrp_fast.nn.linear.TaskConv1D`; modules whose code reads
    their projections' weights (``nn.MultiheadAttention``, torchvision's shifted-window attention) become a
    :class:`~halrp_fast.nn.reparametrized.TaskReparametrized` that runs them with each task's weights; every
    ``BatchNorm1d``/``BatchNorm2d`` a :class:`TaskBatchNorm`, every ``LayerNorm``/``GroupNorm`` a
    :class:`~halrp_fast.nn.norm.TaskNorm` (per-task affine parameters), and the classifier named by ``head``
    (a qualified module name, or ``"last"`` for the last ``nn.Linear``) a :class:`TaskHeads`.  A subclass of
    ``nn.Linear``/``nn.Conv2d`` converts only when its computation is known (:mod:`~halrp_fast.nn.subclasses`:
    inherited forward; timm's weight-standardised and "same"-padded convs keep their own forward with each task's
    weight; :func:`~halrp_fast.nn.subclasses.register_layer_subclass` for others); any other is refused by name.

    ``exclude``: qualified names of modules (and everything below them) to leave as they are; they
    stay shared by all tasks and belong to the base.  Non-zero padding modes and weight layers it cannot perturb
    (Conv1d/Conv3d, transposed convs, Bilinear) are refused unless excluded, all in one error.
    ``inplace=False`` converts a deep copy.

    ``grouped_mixed_batches`` (default: the model's ``halrp_grouped_mixed_batches`` attribute, else False):
    see :class:`TaskModel`; set it only for a network whose non-converted operations never mix channels.

    ``example_input``: a batch the model accepts (a tensor; a tuple or list of positional inputs; a dict of keyword
    inputs, e.g. ``{"input_ids": ids, "attention_mask": mask}``); the converted model then runs it once and refuses
    (one error naming them all, see :meth:`TaskModel.check_coverage`) converted layers whose forward never runs or
    whose weights other code reads directly.  Without it such a read is still an error, at the first forward of a
    task after the base.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, TaskModel):
        raise TypeError("model is already a TaskModel")
    if not inplace:
        model = copy.deepcopy(model)
    head_name = _find_head(model, head)
    skip = tuple(exclude)
    for name in skip:
        model.get_submodule(name)  # raises for a wrong name
    ctx = TaskContext()
    refused: list[tuple[str, str]] = []  # every module that cannot be converted, reported together
    replacements: dict[str, nn.Module] = {}
    def under(name: str, prefixes) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    readers = {n: reparametrized_wrapper(m) for n, m in model.named_modules()
               if n and not under(n, skip) and reparametrized_wrapper(m)}
    taken_over = {f"{n}.{p}" for n in readers for p in projection_modules(model.get_submodule(n))}
    for name, m in model.named_modules():  # layer subclasses that keep their own forward
        if (name and not under(name, (head_name, *skip, *taken_over)) and isinstance(m, (nn.Linear, nn.Conv2d))
                and not isinstance(m, _LAZY)):
            try:
                if conversion_of(m) == OWN_FORWARD:
                    readers[name] = own_forward_wrapper
            except ValueError as exc:
                refused.append((name, str(exc)))
    refused_names = {name for name, _ in refused}
    for name, m in model.named_modules():
        if not name or under(name, skip) or name in readers or under(name, taken_over) or name in refused_names:
            continue
        if isinstance(m, _LAZY) and name != head_name:
            raise ValueError(f"module {name!r} is lazy (uninitialised): run one forward pass before convert()")
        if name == head_name:
            replacements[name] = TaskHeads(m, ctx, head_factory)
        elif isinstance(m, TaskModule):
            raise TypeError(f"module {name!r} is already task-aware")
        elif isinstance(m, nn.Conv2d):
            try:
                replacements[name] = TaskConv2d.from_conv(m, ctx)
            except ValueError as exc:
                refused.append((name, str(exc)))
        elif isinstance(m, nn.Linear):
            replacements[name] = TaskLinear.from_linear(m, ctx)
        elif is_conv1d(m):
            replacements[name] = TaskConv1D.from_conv1d(m, ctx)
        elif _is_unsupported_projection(m):
            refused.append((name, f"{type(m).__name__} is a weight layer halrp_fast cannot perturb (it perturbs "
                                  f"nn.Linear and nn.Conv2d)"))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            replacements[name] = TaskBatchNorm(m, ctx)
        elif is_sample_norm(m):
            replacements[name] = TaskNorm(m, ctx)
    if refused:
        names = [name for name, _ in refused]
        reasons = "; ".join(f"{name!r}: {why}" for name, why in refused)
        raise ValueError(f"cannot convert {len(refused)} module(s): {reasons}. Pass exclude={names} to keep them "
                         f"shared by all tasks")
    # Children of replaced modules must not be replaced twice (e.g. a head that is a Sequential).
    for name in outermost(replacements):
        _set_submodule(model, name, replacements[name])
    for name in sorted(readers, key=len, reverse=True):  # after their children: task-aware modules inside stay so
        _set_submodule(model, name, readers[name](model.get_submodule(name), ctx))
    switched = fast_paths_off(model)
    if grouped_mixed_batches is None:
        grouped_mixed_batches = bool(getattr(model, "halrp_grouped_mixed_batches", False))
    task_model = TaskModel(model, ctx, head_name, grouped_mixed_batches)
    task_model.fast_paths = switched
    task_model.sequence_first = sequence_first_layers(model)
    if not task_model.perturbed_layers():
        warnings.warn(f"convert found no layer to perturb (it perturbs nn.Linear, nn.Conv2d and transformers' Conv1D): "
                      f"every task is the base with its own head and norms; shared by every task: "
                      f"{sorted(task_model.shared_modules())}", UserWarning, stacklevel=2)
    _log.info("convert: %s", task_model.summary())
    if example_input is not None:
        if isinstance(example_input, Mapping):
            task_model.check_coverage(**example_input)
        elif isinstance(example_input, (tuple, list)):
            task_model.check_coverage(*example_input)
        else:
            task_model.check_coverage(example_input)
    return task_model
