"""How ``convert`` treats a layer whose class derives from ``nn.Linear`` or ``nn.Conv2d``.

A task-aware layer computes what the base class computes (``F.linear``/``F.conv2d`` of the task's weight).  A
subclass is converted that way only when its computation is known to be the base class's: it inherits the base
class's ``forward`` (and ``_conv_forward``), or the class that defines them is registered as ``"as_base"``.  A
subclass registered as ``"own_forward"`` (weight standardisation, TensorFlow "same" padding, ...) keeps its own
forward: every task runs it with the task's weight ``diag(r) W diag(s) + U Vᵀ`` and bias in place of its own
(:class:`~halrp_fast.nn.reparametrized.TaskReparametrized`), so task 0 is the original module exactly.  Any other
subclass is refused by name, as are parametrized layers and layers with forward hooks (their computation is not
the class's).
"""
from __future__ import annotations

import functools

from torch import nn
from torch.nn.utils import parametrize

from ._context import TaskContext
from .conv import TaskConv2d, _conv_padding
from .linear import TaskLinear
from .reparametrized import TaskReparametrized

AS_BASE = "as_base"
OWN_FORWARD = "own_forward"

#: "module.QualifiedName" of the class that defines a layer's forward → how its layers convert
_REGISTRY: dict[str, str] = {
    # casts its weight and bias to the input's dtype (for autocast), otherwise nn.Linear
    "timm.layers.linear.Linear": AS_BASE,
    # weight standardisation (BiT ResNet-V2), scaled weight standardisation (NFNet), both with "same" padding
    "timm.layers.std_conv.StdConv2d": OWN_FORWARD,
    "timm.layers.std_conv.StdConv2dSame": OWN_FORWARD,
    "timm.layers.std_conv.ScaledStdConv2d": OWN_FORWARD,
    "timm.layers.std_conv.ScaledStdConv2dSame": OWN_FORWARD,
    # TensorFlow "same" padding (tf_efficientnet, tf_mixnet, ...)
    "timm.layers.conv2d_same.Conv2dSame": OWN_FORWARD,
    "timm.layers.conv2d_same.Conv2dSameExport": OWN_FORWARD,
}
#: the bases, and the methods a subclass overrides to compute differently
_COMPUTING = {nn.Conv2d: ("forward", "_conv_forward"), nn.Linear: ("forward",)}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer_subclass(cls: type, runs: str) -> None:
    """Declare how layers of ``cls`` (a subclass of ``nn.Linear`` or ``nn.Conv2d``) convert: ``runs="as_base"`` when
    its forward computes exactly what the base class's does (then the fused task-aware layer replaces it), or
    ``runs="own_forward"`` to run its own forward with each task's weight and bias in place (any forward that reads
    ``self.weight``/``self.bias``).  Subclasses of ``cls`` that do not override its forward convert the same way."""
    base = _base_of(cls) if isinstance(cls, type) else None
    if base is None:
        raise TypeError(f"cls must be a subclass of nn.Linear or nn.Conv2d, got {cls!r}")
    if runs not in (AS_BASE, OWN_FORWARD):
        raise ValueError(f"runs must be {AS_BASE!r} or {OWN_FORWARD!r}, got {runs!r}")
    _REGISTRY[_qualified(cls)] = runs


def _base_of(cls: type) -> type | None:
    for base in _COMPUTING:
        if issubclass(cls, base) and cls is not base:
            return base
    return None


def computing_class(cls: type) -> type:
    """The first class of ``cls``'s method resolution order that defines how it computes (its forward)."""
    base = _base_of(cls) or cls
    for klass in cls.__mro__:
        if klass is base or any(name in vars(klass) for name in _COMPUTING.get(base, ("forward",))):
            return klass
    return base


def conversion_of(layer: nn.Module) -> str:
    """``"as_base"`` or ``"own_forward"`` for an ``nn.Linear``/``nn.Conv2d`` (subclass), or raise ``ValueError``
    saying why it cannot be converted."""
    cls = type(layer)
    if parametrize.is_parametrized(layer):
        names = sorted(layer.parametrizations.keys())
        raise ValueError(f"its {names} are parametrized (torch.nn.utils.parametrize), which the task's weight would "
                         f"bypass; remove the parametrization first (parametrize.remove_parametrizations)")
    hooks = [kind for kind, found in (("forward pre-hooks", layer._forward_pre_hooks),
                                      ("forward hooks", layer._forward_hooks),
                                      ("backward hooks", layer._backward_hooks)) if found]
    base = _base_of(cls)
    if base is None:  # nn.Linear or nn.Conv2d itself
        how = AS_BASE
    else:
        definer = computing_class(cls)
        how = AS_BASE if definer is base else _REGISTRY.get(_qualified(definer))
        if how is None:
            raise ValueError(
                f"{_qualified(cls)} subclasses {base.__name__} with its own forward (defined by "
                f"{_qualified(definer)}), which a task-aware layer would not run; if that forward only reads "
                f"self.weight and self.bias, declare it with halrp_fast.nn.register_layer_subclass({definer.__name__}, "
                f"runs='own_forward')")
    if hooks and how == AS_BASE:
        raise ValueError(f"it has {' and '.join(hooks)}, which the task-aware layer that replaces it would not run")
    return how


def own_forward_wrapper(layer: nn.Module, ctx: TaskContext) -> TaskReparametrized:
    """``layer`` running its own forward with each task's weight (``layer``'s weight and bias become the
    perturbed layer ``projections["layer"]``)."""
    if isinstance(layer, nn.Conv2d):
        try:
            padding = _conv_padding(layer)
        except ValueError:  # asymmetric 'same': the projection never computes a conv itself
            padding = 0
        projection = functools.partial(TaskConv2d, stride=layer.stride, padding=padding, dilation=layer.dilation,
                                       groups=layer.groups)
    else:
        projection = TaskLinear
    paths = {"layer": ("weight", "bias" if layer.bias is not None else None)}
    return TaskReparametrized(layer, paths, ctx, projection=projection)
