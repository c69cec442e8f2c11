"""The op schemas (namespace ``halrp``), their fake kernels and their autograd.

One schema per op, defined with :func:`torch.library.custom_op`.  The registered kernel validates
the arguments and hands them to the provider that :mod:`halrp_fast._backend` selects for the
device (the pure-PyTorch math of :mod:`halrp_fast.reference` by default).  Fake kernels validate
the same static properties and state the output shapes, so ``torch.compile`` traces through the ops
without a graph break.  Each forward op has a backward op of its own, so a provider can fuse the
gradients too; autograd is registered once, here.

Every forward op takes ``save`` and returns ``(y, saved_base, saved_lowrank)``: with ``save`` the two
tensors the backward reuses (see :mod:`halrp_fast.reference`), otherwise empty placeholders (a provider may
also decline to save; the backward then recomputes).  They are not differentiable outputs.  Gradient
masks (``needs``) are ordered ``(x, weight, r|R, s|S, U, V, bias|B)``; a gradient that is not needed comes
back as an empty tensor.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _backend, _checks, reference

_LIB = "halrp"
_N_GRADS = 7
# (dx, dweight, dr|dR, ds|dS, dU, dV, dbias|dB)
Grads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
# (y, saved base product, saved low-rank intermediate)
Outputs = tuple[Tensor, Tensor, Tensor]


def _needed(grads: Sequence[Tensor], needs: Sequence[bool]) -> tuple[Tensor | None, ...]:
    return tuple(g if n else None for g, n in zip(grads, needs, strict=True))


def layout_of(t: Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D tensor stored that way (and not also plainly contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _conv_layout(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The layout of a conv op's outputs: channels_last when the input or the weight is (as ``F.conv2d``)."""
    if torch.channels_last in (layout_of(x), layout_of(weight)):
        return torch.channels_last
    return torch.contiguous_format


def _in_layout(t: Tensor, layout: torch.memory_format) -> Tensor:
    """``t`` in ``layout`` (4-D tensors; placeholders and other ranks as they are); no copy when it already is."""
    return t.contiguous(memory_format=layout) if t.dim() == 4 else t


def _empty_or(flag: bool, like: Tensor) -> Tensor:
    return torch.empty_like(like, memory_format=layout_of(like)) if flag else like.new_empty(0)


def _fake_outputs(x, y_shape, lowrank_shape, save: bool, layout=torch.contiguous_format) -> Outputs:
    def new(shape):
        return x.new_empty(shape).contiguous(memory_format=layout) if len(shape) == 4 else x.new_empty(shape)

    if not save:
        return new(y_shape), x.new_empty(0), x.new_empty(0)
    return new(y_shape), new(y_shape), new(lowrank_shape)


def _fake_grads(x, weight, r, s, U, V, has_bias: bool, needs: Sequence[bool]) -> Grads:
    _checks.check_grad_mask(needs, _N_GRADS)
    bias_like = r if has_bias else x.new_empty(0)
    return tuple(_empty_or(n, t) for n, t in zip(needs, (x, weight, r, s, U, V, bias_like), strict=True))


# ============================================================================================
# linear, one task
# ============================================================================================
@torch.library.custom_op(f"{_LIB}::perturbed_linear", mutates_args=())
def perturbed_linear(x: Tensor, weight: Tensor, r: Tensor, s: Tensor, U: Tensor, V: Tensor,
                     bias: Tensor | None, save: bool) -> Outputs:
    """``r ⊙ ((s ⊙ x) weightᵀ) + (x V) Uᵀ + bias`` for ``x (..., in)`` → ``(..., out)``, and with ``save``
    ``c = (s ⊙ x) weightᵀ`` and ``x V``."""
    return _forward("perturbed_linear", (x, weight, r, s, U, V, bias), (), save)


@perturbed_linear.register_fake
def _(x, weight, r, s, U, V, bias, save):
    _checks.check_linear(x, weight, r, s, U, V, bias)
    lead = x.shape[:-1]
    return _fake_outputs(x, (*lead, weight.shape[0]), (*lead, U.shape[1]), save)


@torch.library.custom_op(f"{_LIB}::perturbed_linear_backward", mutates_args=())
def perturbed_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, r: Tensor, s: Tensor, U: Tensor,
                              V: Tensor, saved_base: Tensor, saved_lowrank: Tensor, has_bias: bool,
                              needs: Sequence[bool]) -> Grads:
    """Gradients ``(dx, dweight, dr, ds, dU, dV, dbias)`` of :func:`perturbed_linear`."""
    _checks.check_grad_mask(needs, _N_GRADS)
    return _backend.call("perturbed_linear_backward", x.device.type, grad, x, weight, r, s, U, V, saved_base,
                         saved_lowrank, has_bias, list(needs))


@perturbed_linear_backward.register_fake
def _(grad, x, weight, r, s, U, V, saved_base, saved_lowrank, has_bias, needs):
    return _fake_grads(x, weight, r, s, U, V, has_bias, needs)


def _setup_single(ctx, inputs, output):
    x, weight, r, s, U, V, bias = inputs[:7]
    ctx.save_for_backward(x, weight, r, s, U, V, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.has_bias = bias is not None
    ctx.geometry = tuple(inputs[8:])  # conv: (stride, padding, dilation); linear: ()


def _linear_autograd(ctx, grad, _grad_base, _grad_lowrank):
    needs = list(ctx.needs_input_grad[:7])
    grads = perturbed_linear_backward(grad, *ctx.saved_tensors, ctx.has_bias, needs)
    return (*_needed(grads, needs), None)


perturbed_linear.register_autograd(_linear_autograd, setup_context=_setup_single)


# ============================================================================================
# linear, mixed tasks
# ============================================================================================
@torch.library.custom_op(f"{_LIB}::perturbed_linear_mt", mutates_args=())
def perturbed_linear_mt(x: Tensor, task_ids: Tensor, weight: Tensor, R: Tensor, S: Tensor, U: Tensor,
                        V: Tensor, B: Tensor | None, save: bool) -> Outputs:
    """Row ``m`` of ``x (M, ..., in)`` through task ``task_ids[m]`` of the banks → ``(M, ..., out)``."""
    return _forward("perturbed_linear_mt", (x, task_ids, weight, R, S, U, V, B), (), save)


@perturbed_linear_mt.register_fake
def _(x, task_ids, weight, R, S, U, V, B, save):
    _checks.check_linear_mt(x, task_ids, weight, R, S, U, V, B)
    lead = x.shape[:-1]
    return _fake_outputs(x, (*lead, weight.shape[0]), (*lead, U.shape[2]), save)


@torch.library.custom_op(f"{_LIB}::perturbed_linear_mt_backward", mutates_args=())
def perturbed_linear_mt_backward(grad: Tensor, x: Tensor, task_ids: Tensor, weight: Tensor, R: Tensor,
                                 S: Tensor, U: Tensor, V: Tensor, saved_base: Tensor, saved_lowrank: Tensor,
                                 has_bias: bool, needs: Sequence[bool]) -> Grads:
    """Gradients ``(dx, dweight, dR, dS, dU, dV, dB)`` of :func:`perturbed_linear_mt`."""
    _checks.check_grad_mask(needs, _N_GRADS)
    return _backend.call("perturbed_linear_mt_backward", x.device.type, grad, x, task_ids, weight, R, S, U, V,
                         saved_base, saved_lowrank, has_bias, list(needs))


@perturbed_linear_mt_backward.register_fake
def _(grad, x, task_ids, weight, R, S, U, V, saved_base, saved_lowrank, has_bias, needs):
    return _fake_grads(x, weight, R, S, U, V, has_bias, needs)


def _setup_mixed(ctx, inputs, output):
    x, task_ids, weight, R, S, U, V, B = inputs[:8]
    ctx.save_for_backward(x, task_ids, weight, R, S, U, V, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.has_bias = B is not None
    ctx.geometry = tuple(inputs[9:])


def _mixed_needs(ctx) -> list[bool]:
    n = list(ctx.needs_input_grad)
    return n[:1] + n[2:8]  # drop task_ids


def _mixed_grads(grads, ctx):
    g = _needed(grads, _mixed_needs(ctx))
    return (g[0], None, *g[1:], None)  # no gradient for task_ids and save


def _linear_mt_autograd(ctx, grad, _grad_base, _grad_lowrank):
    grads = perturbed_linear_mt_backward(grad, *ctx.saved_tensors, ctx.has_bias, _mixed_needs(ctx))
    return _mixed_grads(grads, ctx)


perturbed_linear_mt.register_autograd(_linear_mt_autograd, setup_context=_setup_mixed)


# ============================================================================================
# conv, one task
# ============================================================================================
def _geometry(stride, padding, dilation):
    return _checks.conv_geometry(tuple(stride), tuple(padding), tuple(dilation))


@torch.library.custom_op(f"{_LIB}::perturbed_conv2d", mutates_args=())
def perturbed_conv2d(x: Tensor, weight: Tensor, r: Tensor, s: Tensor, U: Tensor, V: Tensor, bias: Tensor | None,
                     save: bool, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Outputs:
    """``r ⊙ conv(s ⊙ x, weight) + U · Σ_window(Vᵀ · x) + bias`` for ``x (N, C_in, H, W)``, and with
    ``save`` ``c = conv(s ⊙ x, weight)`` and ``Σ_window(Vᵀ · x)``."""
    return _forward("perturbed_conv2d", (x, weight, r, s, U, V, bias), _geometry(stride, padding, dilation), save)


def _conv_fake_outputs(x, weight, k, geo, save):
    ho, wo = _checks.conv_out_hw(x, weight, *geo)
    return _fake_outputs(x, (x.shape[0], weight.shape[0], ho, wo), (x.shape[0], k, ho, wo), save,
                         _conv_layout(x, weight))


def _conv_saves(x: Tensor, weight: Tensor, k: int, geo: tuple) -> bool:
    """Whether the forward serving ``x``'s device returns ``c`` and ``pooled`` when asked to save: the reference
    CPU path does not when the layer trains through its merged weight (its backward needs neither)."""
    provider, _ = _backend.select("perturbed_conv2d", x.device.type, _backend.dtype_name(x))
    return provider != "reference" or not reference.conv_through_merged_weight(x, weight, k, *geo)


@perturbed_conv2d.register_fake
def _(x, weight, r, s, U, V, bias, save, stride, padding, dilation):
    geo = _geometry(stride, padding, dilation)
    _checks.check_conv(x, weight, r, s, U, V, bias, *geo)
    return _conv_fake_outputs(x, weight, U.shape[1], geo, save and _conv_saves(x, weight, U.shape[1], geo))


@torch.library.custom_op(f"{_LIB}::perturbed_conv2d_backward", mutates_args=())
def perturbed_conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, r: Tensor, s: Tensor, U: Tensor,
                              V: Tensor, saved_base: Tensor, saved_lowrank: Tensor, has_bias: bool,
                              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                              needs: Sequence[bool]) -> Grads:
    """Gradients ``(dx, dweight, dr, ds, dU, dV, dbias)`` of :func:`perturbed_conv2d`."""
    _checks.check_grad_mask(needs, _N_GRADS)
    geo = _geometry(stride, padding, dilation)
    grads = _backend.call("perturbed_conv2d_backward", x.device.type, grad, x, weight, r, s, U, V, saved_base,
                          saved_lowrank, has_bias, *geo, list(needs))
    return _like_inputs(grads, (x, weight))


@perturbed_conv2d_backward.register_fake
def _(grad, x, weight, r, s, U, V, saved_base, saved_lowrank, has_bias, stride, padding, dilation, needs):
    return _fake_grads(x, weight, r, s, U, V, has_bias, needs)


def _like_inputs(grads: Grads, conv_inputs: tuple[Tensor, Tensor]) -> Grads:
    """``dx``, ``dweight`` in the layouts of ``x``, ``weight`` (the layouts the fake kernels state)."""
    dx, dw = (_in_layout(g, layout_of(t)) for g, t in zip(grads[:2], conv_inputs, strict=True))
    return (dx, dw, *grads[2:])


def _conv_autograd(ctx, grad, _grad_base, _grad_lowrank):
    needs = list(ctx.needs_input_grad[:7])
    grads = perturbed_conv2d_backward(grad, *ctx.saved_tensors, ctx.has_bias, *ctx.geometry, needs)
    return (*_needed(grads, needs), None, None, None, None)


perturbed_conv2d.register_autograd(_conv_autograd, setup_context=_setup_single)


# ============================================================================================
# conv, mixed tasks
# ============================================================================================
@torch.library.custom_op(f"{_LIB}::perturbed_conv2d_mt", mutates_args=())
def perturbed_conv2d_mt(x: Tensor, task_ids: Tensor, weight: Tensor, R: Tensor, S: Tensor, U: Tensor, V: Tensor,
                        B: Tensor | None, save: bool, stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int]) -> Outputs:
    """Image ``n`` of ``x (N, C_in, H, W)`` through task ``task_ids[n]`` of the banks."""
    args = (x, task_ids, weight, R, S, U, V, B)
    return _forward("perturbed_conv2d_mt", args, _geometry(stride, padding, dilation), save)


@perturbed_conv2d_mt.register_fake
def _(x, task_ids, weight, R, S, U, V, B, save, stride, padding, dilation):
    geo = _geometry(stride, padding, dilation)
    _checks.check_conv_mt(x, task_ids, weight, R, S, U, V, B, *geo)
    return _conv_fake_outputs(x, weight, U.shape[2], geo, save)


@torch.library.custom_op(f"{_LIB}::perturbed_conv2d_mt_backward", mutates_args=())
def perturbed_conv2d_mt_backward(grad: Tensor, x: Tensor, task_ids: Tensor, weight: Tensor, R: Tensor, S: Tensor,
                                 U: Tensor, V: Tensor, saved_base: Tensor, saved_lowrank: Tensor, has_bias: bool,
                                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                 needs: Sequence[bool]) -> Grads:
    """Gradients ``(dx, dweight, dR, dS, dU, dV, dB)`` of :func:`perturbed_conv2d_mt`."""
    _checks.check_grad_mask(needs, _N_GRADS)
    geo = _geometry(stride, padding, dilation)
    grads = _backend.call("perturbed_conv2d_mt_backward", x.device.type, grad, x, task_ids, weight, R, S, U, V,
                          saved_base, saved_lowrank, has_bias, *geo, list(needs))
    return _like_inputs(grads, (x, weight))


@perturbed_conv2d_mt_backward.register_fake
def _(grad, x, task_ids, weight, R, S, U, V, saved_base, saved_lowrank, has_bias, stride, padding, dilation, needs):
    return _fake_grads(x, weight, R, S, U, V, has_bias, needs)


def _conv_mt_autograd(ctx, grad, _grad_base, _grad_lowrank):
    grads = perturbed_conv2d_mt_backward(grad, *ctx.saved_tensors, ctx.has_bias, *ctx.geometry, _mixed_needs(ctx))
    return (*_mixed_grads(grads, ctx), None, None, None)


perturbed_conv2d_mt.register_autograd(_conv_mt_autograd, setup_context=_setup_mixed)


# ============================================================================================
# least-squares scalings (rank estimation)
# ============================================================================================
@torch.library.custom_op(f"{_LIB}::fit_scalings", mutates_args=())
def fit_scalings(W_free: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """``r (out,)``, ``s (in,)`` of the least-squares fit ``W_free ≈ diag(r) W diag(s)`` (no autograd)."""
    _checks.check_scalings(W_free, W)
    return _backend.call("fit_scalings", W.device.type, W_free, W)


@fit_scalings.register_fake
def _(W_free, W):
    _checks.check_scalings(W_free, W)
    return W.new_empty(W.shape[0]), W.new_empty(W.shape[1])


# ============================================================================================
# eager path
# ============================================================================================
# The custom ops above are what torch.compile and torch.ops callers see.  In eager mode the public
# functions go through `eager_apply` instead: the same `_forward` (checks + provider) and the same backward
# implementations, without the generic custom-op dispatch and autograd wrapper (measured at M = 1 on CPU:
# 81 → 43 µs per call with autograd, 43 → 29 µs without).

def _forward(name: str, args: tuple, geo: tuple, save: bool):
    """Validate ``args`` of op ``name`` and run its provider: the body of the custom op and of the eager path."""
    if name == "perturbed_linear":
        _checks.check_linear(*args)
    elif name == "perturbed_linear_mt":
        _checks.check_linear_mt(*args)
    elif name == "perturbed_conv2d":
        _checks.check_conv(*args, *geo)
    else:
        _checks.check_conv_mt(*args, *geo)
    if name.endswith("_mt"):
        _checks.check_task_id_range(args[1], args[3].shape[0])
    out = _backend.call(name, args[0].device.type, *args, *geo, save)
    if geo:  # conv: every provider's outputs in the layout F.conv2d would give (and the fake kernels state)
        layout = _conv_layout(args[0], args[2] if name.endswith("_mt") else args[1])
        out = tuple(_in_layout(t, layout) for t in out)
    return out


class _EagerOp(torch.autograd.Function):
    """Autograd for one call of ``name`` on ``args`` (x, [task_ids,] weight, r|R, s|S, U, V, bias|B)."""

    @staticmethod
    def forward(ctx, name, geo, *args):
        mixed = name.endswith("_mt")
        needs = list(ctx.needs_input_grad[2:])
        if mixed:
            del needs[1]  # task_ids
        y, base, lowrank = _forward(name, args, geo, save=True)
        ctx.save_for_backward(*args[:-1], base, lowrank)
        ctx.name, ctx.geo, ctx.mixed, ctx.needs, ctx.has_bias = name, geo, mixed, needs, args[-1] is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        grads = _backend.call(f"{ctx.name}_backward", saved[0].device.type, grad, *saved, ctx.has_bias, *ctx.geo,
                              ctx.needs)
        out = list(_needed(grads, ctx.needs))
        if ctx.mixed:
            out.insert(1, None)
        return (None, None, *out)


def needs_grad(tensors) -> bool:
    """True when autograd will run a backward through a call on ``tensors`` (``None`` entries allowed)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def eager_apply(name: str, args: tuple, geo: tuple = ()) -> Tensor:
    """Run op ``name`` eagerly (``args`` as in its schema, without ``save``); autograd when needed."""
    if needs_grad(args):
        return _EagerOp.apply(name, geo, *args)
    return _forward(name, args, geo, save=False)[0]
