"""Argument validation shared by the op implementations and their fake (meta) kernels.

Every check raises early with a message that names the argument, the expected and the actual
shape / dtype / device.  Only static properties are checked here (they work on FakeTensors under
``torch.compile``); value checks such as the range of ``task_ids`` live in :func:`check_task_id_range`,
which the real kernels call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._math import conv_out_hw


def check_number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> None:
    """A finite real number (no bool, NaN or ±inf) within the bounds, else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-∞" if low is None else f"{low:g}"
        hi = "∞" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {'(' if low_open or low is None else '['}{lo}, {hi}"
                         f"{')' if high_open or high is None else ']'}, got {value}")


def check_int(name: str, value, low: int | None = None, high: int | None = None, high_name: str | None = None) -> None:
    """An int (no bool) within ``[low, high]``, else an error naming ``name`` (and ``high_name``, the bound's)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        hi = "∞" if high is None else (f"{high_name}={high}" if high_name else str(high))
        raise ValueError(f"{name} must be in [{'-∞' if low is None else low}, {hi}], got {value}")


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_desc(t)}")


def check_tensors(optional: Sequence[str] = (), **named) -> None:
    """Every argument must be a tensor (those named in ``optional`` may be ``None``)."""
    for name, t in named.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            kind = "an int64 tensor of shape (M,)" if name == "task_ids" else "a torch.Tensor"
            raise TypeError(f"{name} must be {kind}, got {type(t).__name__}")


def check_like(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "x") -> None:
    """``t`` must be floating, with the dtype and device of ``ref``."""
    check_floating(name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {_desc(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {_desc(t)}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} {meaning}, got {_desc(t)}")


def check_lowrank_pair(U: torch.Tensor, V: torch.Tensor, out: int, inp: int, banked: int | None) -> int:
    """Check ``U (out, k)``, ``V (in, k)`` (or ``(T, out, k)``, ``(T, in, k)`` when banked) and return k."""
    lead = () if banked is None else (banked,)
    tag = "" if banked is None else "T, "
    if U.dim() != len(lead) + 2:
        raise ValueError(f"U must have shape ({tag}out={out}, k), got {_desc(U)}")
    if V.dim() != len(lead) + 2:
        raise ValueError(f"V must have shape ({tag}in={inp}, k), got {_desc(V)}")
    k = U.shape[-1]
    check_shape("U", U, (*lead, out, k), f"({tag}out, k)")
    if tuple(V.shape) != (*lead, inp, k):
        raise ValueError(
            f"V must have shape {(*lead, inp, k)} ({tag}in, k) with the rank k={k} of U, got {_desc(V)}"
        )
    return k


def _check_linear_core(x, weight, rows: str, min_dim: int) -> tuple[int, int]:
    """x floating with ≥ ``min_dim`` dims and last dim ``in``; weight ``(out, in)``; returns (out, in)."""
    check_floating("x", x)
    if x.dim() < min_dim:
        raise ValueError(f"x must have shape ({rows}in), got {_desc(x)}")
    check_like("weight", weight, x)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out, in), got {_desc(weight)}")
    out, inp = weight.shape
    if x.shape[-1] != inp:
        raise ValueError(f"x must have shape ({rows}in={inp}) to match weight {tuple(weight.shape)}, got {_desc(x)}")
    return out, inp


def check_linear(x, weight, r, s, U, V, bias) -> None:
    """Single-task linear: x (..., in), weight (out, in), r (out,), s (in,), U (out, k), V (in, k), bias (out,)."""
    try:  # the common case in one expression; the messages come from the step-by-step checks below
        dt, dev = x.dtype, x.device
        out, inp = weight.shape
        k = U.shape[-1]
        if (x.is_floating_point() and x.shape[-1] == inp and weight.dtype == dt and r.dtype == dt
                and s.dtype == dt and U.dtype == dt and V.dtype == dt and r.shape == (out,) and s.shape == (inp,)
                and U.shape == (out, k) and V.shape == (inp, k) and weight.device == dev and r.device == dev
                and s.device == dev and U.device == dev and V.device == dev
                and (bias is None or (bias.dtype == dt and bias.shape == (out,) and bias.device == dev))):
            return
    except (AttributeError, TypeError, ValueError, IndexError):
        pass
    check_tensors(("bias",), x=x, weight=weight, r=r, s=s, U=U, V=V, bias=bias)
    out, inp = _check_linear_core(x, weight, "..., ", 1)
    _check_task_tensors(x, r, s, U, V, bias, out, inp, "out", "in")


def _check_task_tensors(x, r, s, U, V, bias, out: int, inp: int, out_name: str, in_name: str) -> None:
    """One task's ``r (out,)``, ``s (in,)``, ``U (out, k)``, ``V (in, k)``, ``bias (out,)`` like ``x``."""
    for name, t in (("r", r), ("s", s), ("U", U), ("V", V)):
        check_like(name, t, x)
    check_shape("r", r, (out,), f"({out_name},)")
    check_shape("s", s, (inp,), f"({in_name},)")
    check_lowrank_pair(U, V, out, inp, None)
    if bias is not None:
        check_like("bias", bias, x)
        check_shape("bias", bias, (out,), f"({out_name},)")


def check_task_ids(task_ids: torch.Tensor, batch: int, device: torch.device) -> None:
    if not isinstance(task_ids, torch.Tensor):
        raise TypeError(f"task_ids must be an int64 tensor of shape ({batch},), got {type(task_ids).__name__}")
    if task_ids.dtype != torch.int64:
        raise TypeError(f"task_ids must be int64 with shape ({batch},), got {_desc(task_ids)}")
    if tuple(task_ids.shape) != (batch,):
        raise ValueError(f"task_ids must have shape ({batch},) (one task per row of x), got {_desc(task_ids)}")
    if task_ids.device != device:
        raise ValueError(f"task_ids must be on the device of x ({device}), got {_desc(task_ids)}")


def check_task_id_range(task_ids: torch.Tensor, num_tasks: int) -> None:
    """Value check (real kernels only): every id in ``[0, num_tasks)``."""
    n = task_ids.numel()
    if n == 0:
        return
    if n <= 256 and task_ids.device.type == "cpu":  # a short list is read faster than reduced
        ids = task_ids.tolist()
        lo, hi = min(ids), max(ids)
    else:
        lo, hi = torch.stack(torch.aminmax(task_ids)).tolist()  # one reduction, one device sync
    if lo < 0 or hi >= num_tasks:
        bad = lo if lo < 0 else hi
        raise ValueError(f"task_ids must lie in [0, {num_tasks}) (the size of the task banks), found {bad}")


def check_linear_mt(x, task_ids, weight, R, S, U, V, B) -> None:
    """Mixed-task linear: x (M, ..., in), task_ids (M,), banks R (T, out), S (T, in), U (T, out, k), ..."""
    try:  # the common case in one expression; the messages come from the step-by-step checks below
        dt, dev = x.dtype, x.device
        out, inp = weight.shape
        T, k = R.shape[0], U.shape[-1]
        if (x.is_floating_point() and x.dim() >= 2 and x.shape[-1] == inp and task_ids.dtype == torch.int64
                and task_ids.shape == (x.shape[0],) and _banks_ok(dt, dev, weight, R, S, U, V, B, T, out, inp, k)
                and task_ids.device == dev):
            return
    except (AttributeError, TypeError, ValueError, IndexError):
        pass
    check_tensors(("B",), x=x, task_ids=task_ids, weight=weight, R=R, S=S, U=U, V=V, B=B)
    out, inp = _check_linear_core(x, weight, "M, ..., ", 2)
    check_task_ids(task_ids, x.shape[0], x.device)
    _check_banks(x, R, S, U, V, B, out, inp)


def _banks_ok(dt, dev, weight, R, S, U, V, B, T: int, out: int, inp: int, k: int) -> bool:
    return (weight.dtype == dt and R.dtype == dt and S.dtype == dt and U.dtype == dt and V.dtype == dt
            and R.shape == (T, out) and S.shape == (T, inp) and U.shape == (T, out, k) and V.shape == (T, inp, k)
            and weight.device == dev and R.device == dev and S.device == dev and U.device == dev
            and V.device == dev and (B is None or (B.dtype == dt and B.shape == (T, out) and B.device == dev)))


def _check_banks(x, R, S, U, V, B, out: int, inp: int) -> int:
    for name, t in (("R", R), ("S", S), ("U", U), ("V", V)):
        check_like(name, t, x)
    if R.dim() != 2 or R.shape[1] != out:
        raise ValueError(f"R must have shape (T, out={out}), got {_desc(R)}")
    T = R.shape[0]
    check_shape("S", S, (T, inp), f"(T={T}, in={inp})")
    check_lowrank_pair(U, V, out, inp, T)
    if B is not None:
        check_like("B", B, x)
        check_shape("B", B, (T, out), f"(T={T}, out={out})")
    return T


def _pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, Sequence) and len(v) == 2 and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def conv_geometry(stride, padding, dilation) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Normalise and validate stride (≥ 1), padding (≥ 0) and dilation (≥ 1) to pairs."""
    st, pd, dl = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    if min(st) < 1:
        raise ValueError(f"stride must be ≥ 1, got {st}")
    if min(pd) < 0:
        raise ValueError(f"padding must be ≥ 0, got {pd}")
    if min(dl) < 1:
        raise ValueError(f"dilation must be ≥ 1, got {dl}")
    return st, pd, dl


def _check_conv_core(x, weight, stride, padding, dilation) -> tuple[int, int]:
    check_floating("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C_in, H, W), got {_desc(x)}")
    check_like("weight", weight, x)
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape (C_out, C_in, kh, kw) (groups=1 only), got {_desc(weight)}")
    out, inp = weight.shape[0], weight.shape[1]
    if x.shape[1] != inp:
        raise ValueError(
            f"x must have C_in={inp} channels to match weight {tuple(weight.shape)} (groups=1 only), got {_desc(x)}"
        )
    ho, wo = conv_out_hw(x, weight, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"x spatial size {tuple(x.shape[-2:])} is too small for kernel {tuple(weight.shape[-2:])} with "
            f"stride {tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)}"
        )
    return out, inp


def check_conv(x, weight, r, s, U, V, bias, stride, padding, dilation) -> None:
    """Single-task conv: x (N, C_in, H, W), weight (C_out, C_in, kh, kw), r (C_out,), s (C_in,), U, V."""
    check_tensors(("bias",), x=x, weight=weight, r=r, s=s, U=U, V=V, bias=bias)
    out, inp = _check_conv_core(x, weight, stride, padding, dilation)
    _check_task_tensors(x, r, s, U, V, bias, out, inp, "C_out", "C_in")


def check_conv_mt(x, task_ids, weight, R, S, U, V, B, stride, padding, dilation) -> None:
    """Mixed-task conv: x (N, C_in, H, W), task_ids (N,), banks R (T, C_out), S (T, C_in), U, V, B."""
    check_tensors(("B",), x=x, task_ids=task_ids, weight=weight, R=R, S=S, U=U, V=V, B=B)
    out, inp = _check_conv_core(x, weight, stride, padding, dilation)
    check_task_ids(task_ids, x.shape[0], x.device)
    _check_banks(x, R, S, U, V, B, out, inp)


def check_scalings(W_free, W) -> None:
    """``W`` a linear ``(out, in)`` or conv ``(out, in, kh, kw)`` weight; ``W_free`` like it."""
    check_floating("W", W)
    check_like("W_free", W_free, W, "W")
    if W.dim() not in (2, 4):
        raise ValueError(f"W must be a linear (out, in) or conv (out, in, kh, kw) weight, got {_desc(W)}")
    if W_free.shape != W.shape:
        raise ValueError(f"W_free must have the shape of W {tuple(W.shape)}, got {_desc(W_free)}")


def check_grad_mask(needs: Sequence[bool], n: int) -> None:
    if len(needs) != n:
        raise ValueError(f"the gradient mask must have {n} entries, got {len(needs)}")
