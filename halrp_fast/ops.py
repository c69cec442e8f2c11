"""The ops of namespace ``halrp``, registered and run from the op table (:mod:`halrp_fast._optable`).

An :class:`OpSpec` says what an op is: its name and schema, its checker, whether it is mixed-task (a ``task_ids``
argument after ``x``) and whether it is a conv (``stride, padding, dilation`` after ``save``).
From that one declaration this module registers the op, its fake kernel (output shapes and strides from the
inputs alone), its backward op and its autograd, and runs eager calls:

    schema (OpSpec) → validation (spec.check, once per call) → router (_backend.select) → provider → kernel

Every forward op takes ``save`` and returns ``(y, saved_base, saved_lowrank)``: with ``save`` the two tensors the
backward reuses (see :mod:`halrp_fast.reference`), otherwise empty placeholders; they are not differentiable
outputs.  Gradient masks (``needs``) are ordered ``(x, weight, r|R, s|S, U, V, bias|B)``; a gradient that is not
needed comes back as an empty tensor.  Providers take exactly the schema's arguments, in its order.

Two entries run an op.  ``torch.ops.halrp.*`` (and ``torch.compile``, which traces them through their fake
kernels) go through the dispatcher and the registered autograd.  Eager calls of :mod:`halrp_fast.functional` go
through :func:`apply`: the same validation, the same provider and the same backward body, without the
dispatcher's generic custom-op wrapper (at serving sizes that wrapper alone costs more than the arithmetic;
``bench/bench_overhead.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _backend, _checks
from ._math import conv_layout, conv_out_hw, in_layout, layout_of
from ._optable import (  # noqa: F401  (the table's entries are this module's public names too)
    CONV2D,
    CONV2D_MT,
    FIT_SCALINGS_SCHEMA,
    LINEAR,
    LINEAR_MT,
    N_GRADS,
    TABLE,
    OpSpec,
)

_LIB = torch.library.Library("halrp", "DEF")
_N_GRADS = N_GRADS


# ============================================================================================
# bodies shared by the registered kernels and the eager path
# ============================================================================================
def _geometry(geo: Sequence) -> tuple:
    return _checks.conv_geometry(*geo) if geo else ()


def validate(spec: OpSpec, inputs: Sequence, geo: tuple) -> None:
    """Everything a real call checks: the static properties, and for mixed ops the range of ``task_ids``."""
    spec.check(*inputs, *geo)
    if spec.mixed:
        _checks.check_task_id_range(inputs[1], inputs[3].shape[0])


def run_forward(spec: OpSpec, inputs: Sequence[Tensor], save: bool, geo: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """The provider's forward on validated ``inputs``; conv outputs in the layout ``F.conv2d`` gives.  Without
    ``save`` the two placeholders may be one tensor."""
    x = inputs[0]
    out = _backend.select(spec.name, x.device.type, x.dtype)[1](*inputs, save, *geo)
    if spec.conv:
        layout = conv_layout(x, inputs[spec.weight_index])
        out = tuple(in_layout(t, layout) for t in out)
    return out


def run_backward(spec: OpSpec, grad: Tensor, saved: Sequence[Tensor], has_bias: bool, geo: tuple,
                 needs: list[bool]) -> tuple[Tensor, ...]:
    """The provider's backward: ``saved`` = the inputs without the bias, then ``saved_base, saved_lowrank``."""
    _checks.check_grad_mask(needs, _N_GRADS)
    x = saved[0]
    grads = _backend.select(f"{spec.name}_backward", x.device.type, grad.dtype)[1](grad, *saved, has_bias, *geo,
                                                                                   needs)
    if spec.conv:  # dx, dweight in the layouts of x, weight (the layouts the fake kernels state)
        w = saved[spec.weight_index]
        grads = (in_layout(grads[0], layout_of(x)), in_layout(grads[1], layout_of(w)), *grads[2:])
    return tuple(grads)


# ============================================================================================
# registration, driven by the table
# ============================================================================================
def _fake_forward(spec: OpSpec, inputs, save: bool, geo: tuple):
    x, weight, U = inputs[0], inputs[spec.weight_index], inputs[spec.weight_index + 3]
    k = U.shape[-1]
    if spec.conv:
        ho, wo = conv_out_hw(x, weight, *geo)
        layout = conv_layout(x, weight)
        y_shape, low_shape = (x.shape[0], weight.shape[0], ho, wo), (x.shape[0], k, ho, wo)

        def new(shape):
            return x.new_empty(shape).contiguous(memory_format=layout)
    else:
        y_shape, low_shape = (*x.shape[:-1], weight.shape[0]), (*x.shape[:-1], k)
        new = x.new_empty
    if not save:
        return new(y_shape), x.new_empty(0), x.new_empty(0)
    return new(y_shape), new(y_shape), new(low_shape)


def _fake_backward(spec: OpSpec, saved, has_bias: bool, needs):
    _checks.check_grad_mask(needs, _N_GRADS)
    x, weight, r, s, U, V = (saved[0], *saved[spec.weight_index:spec.weight_index + 5])
    like = (x, weight, r, s, U, V, r if has_bias else x.new_empty(0))

    def empty_or(flag, t):
        return torch.empty_like(t, memory_format=layout_of(t)) if flag else t.new_empty(0)

    return tuple(empty_or(n, t) for n, t in zip(needs, like, strict=True))


def _split_forward(spec: OpSpec, args: tuple) -> tuple[tuple, bool, tuple]:
    n = spec.n_inputs
    return args[:n], args[n], _geometry(args[n + 1:])


def _split_backward(spec: OpSpec, args: tuple) -> tuple[Tensor, tuple, bool, tuple, list[bool]]:
    """``(grad, saved, has_bias, geo, needs)`` from a backward op's arguments."""
    n = spec.n_inputs + 1  # inputs without the bias, plus the two saved tensors
    return args[0], args[1:n + 1], args[n + 1], _geometry(args[n + 2:-1]), list(args[-1])


def _register(spec: OpSpec) -> tuple[Callable, Callable]:
    qualname, bwd_name = f"halrp::{spec.name}", f"{spec.name}_backward"
    _LIB.define(spec.name + spec.schema())
    _LIB.define(bwd_name + spec.backward_schema())

    def forward_kernel(*args):
        inputs, save, geo = _split_forward(spec, args)
        validate(spec, inputs, geo)
        return _distinct(tuple(map(_not_a_view, run_forward(spec, inputs, save, geo))))

    def forward_fake(*args):
        inputs, save, geo = _split_forward(spec, args)
        spec.check(*inputs, *geo)
        return _fake_forward(spec, inputs, save, geo)

    def backward_kernel(*args):
        grad, saved, has_bias, geo, needs = _split_backward(spec, args)
        return _distinct(run_backward(spec, grad, saved, has_bias, geo, needs))

    def backward_fake(*args):
        _, saved, has_bias, _, needs = _split_backward(spec, args)
        return _fake_backward(spec, saved, has_bias, needs)

    _LIB.impl(spec.name, forward_kernel, "CompositeExplicitAutograd")
    _LIB.impl(bwd_name, backward_kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, forward_fake, lib=_LIB)
    torch.library.register_fake(f"halrp::{bwd_name}", backward_fake, lib=_LIB)
    backward_op = getattr(torch.ops.halrp, bwd_name).default

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*_saved(spec, inputs, output))
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.has_bias = inputs[spec.n_inputs - 1] is not None
        ctx.geo = tuple(inputs[spec.n_inputs + 1:])

    def autograd(ctx, grad, _grad_base, _grad_lowrank):
        needs = spec.grad_mask(ctx.needs_input_grad)
        grads = backward_op(grad, *ctx.saved_tensors, ctx.has_bias, *ctx.geo, needs)
        return (*spec.input_grads(grads, needs), None, *(None for _ in ctx.geo))

    torch.library.register_autograd(qualname, autograd, setup_context=setup_context, lib=_LIB)
    return getattr(torch.ops.halrp, spec.name).default, backward_op


def _not_a_view(t: Tensor) -> Tensor:
    """An output handed to autograd: a provider may return a reshaped view of its own buffer, on which autograd
    would refuse in-place ops (an inplace activation after the layer); ``detach()`` is an alias that is not a view.
    (Not needed on the no-grad path.)"""
    return t.detach() if t._is_view() else t


def _distinct(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``outputs`` with any tensor repeated (a provider's shared placeholder) replaced by a fresh empty one: an
    op's outputs must not alias each other."""
    seen: set[int] = set()
    out = []
    for t in outputs:
        out.append(t.new_empty(0) if id(t) in seen else t)
        seen.add(id(t))
    return tuple(out)


def _saved(spec: OpSpec, inputs: Sequence, output: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """What a backward needs: the inputs without the bias, then the forward's two saved tensors."""
    return (*inputs[:spec.n_inputs - 1], output[1], output[2])


_OPS = {spec.name: _register(spec) for spec in TABLE}
perturbed_linear, perturbed_linear_backward = _OPS["perturbed_linear"]
perturbed_linear_mt, perturbed_linear_mt_backward = _OPS["perturbed_linear_mt"]
perturbed_conv2d, perturbed_conv2d_backward = _OPS["perturbed_conv2d"]
perturbed_conv2d_mt, perturbed_conv2d_mt_backward = _OPS["perturbed_conv2d_mt"]


# ============================================================================================
# least-squares scalings (rank estimation; no autograd)
# ============================================================================================
_LIB.define("fit_scalings" + FIT_SCALINGS_SCHEMA)


def _fit_scalings_kernel(W_free, W):
    _checks.check_scalings(W_free, W)
    return _backend.select("fit_scalings", W.device.type, W.dtype)[1](W_free, W)


def _fit_scalings_fake(W_free, W):
    _checks.check_scalings(W_free, W)
    return W.new_empty(W.shape[0]), W.new_empty(W.shape[1])


_LIB.impl("fit_scalings", _fit_scalings_kernel, "CompositeExplicitAutograd")
torch.library.register_fake("halrp::fit_scalings", _fit_scalings_fake, lib=_LIB)
fit_scalings = torch.ops.halrp.fit_scalings.default


# ============================================================================================
# eager path
# ============================================================================================
def _eager_function(spec: OpSpec) -> type[torch.autograd.Function]:
    """Autograd of one eager call of ``spec``: the forward and backward bodies of the registered op, without the
    dispatcher.  ``apply(*inputs)``, or ``apply(geo, *inputs)`` for a conv (each extra argument of ``apply``
    costs, so the spec is bound here rather than passed)."""
    n_leading = 1 if spec.conv else 0

    def forward(ctx, *args):
        geo, inputs = (args[0], args[1:]) if spec.conv else ((), args)
        out = run_forward(spec, inputs, True, geo)
        ctx.save_for_backward(*_saved(spec, inputs, out))
        ctx.geo, ctx.has_bias = geo, inputs[-1] is not None
        return _not_a_view(out[0])

    def backward(ctx, grad):
        needs = spec.grad_mask(ctx.needs_input_grad[n_leading:])
        grads = run_backward(spec, grad, ctx.saved_tensors, ctx.has_bias, ctx.geo, needs)
        return (*(None,) * n_leading, *spec.input_grads(grads, needs))

    return type(f"Eager_{spec.name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_EAGER = {spec.name: _eager_function(spec) for spec in TABLE}


def needs_grad(tensors) -> bool:
    """True when autograd will run a backward through a call on ``tensors`` (``None`` entries allowed)."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def apply(spec: OpSpec, inputs: tuple, geo: tuple = ()) -> Tensor:
    """Run ``spec`` on ``inputs`` (its schema's inputs, without ``save``; ``geo`` normalised): under
    ``torch.compile`` the registered op (no graph break, saving intermediates when a backward follows), else
    validated once and served by the provider, with autograd when needed."""
    if torch.compiler.is_compiling():
        return _OPS[spec.name][0](*inputs, needs_grad([t for t in inputs if isinstance(t, Tensor)]), *geo)[0]
    validate(spec, inputs, geo)
    if needs_grad(inputs):
        x = inputs[0]
        fused = _backend.select_autograd(spec.name, x.device.type, x.dtype)
        if fused is not None:  # the provider's own autograd around the same forward and backward kernels
            return fused(*inputs, *geo)
        function = _EAGER[spec.name]
        return function.apply(geo, *inputs) if spec.conv else function.apply(*inputs)
    return run_forward(spec, inputs, False, geo)[0]
