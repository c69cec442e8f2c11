"""The compiled extension ``halrp_fast._C``: loading it, and saying why it is absent.

Importing ``halrp_fast._C`` loads a shared library that registers each compiled kernel as a private op of its
own, ``torch.ops._halrp_C.<kernel>``, taking the arguments of the ``halrp`` op it serves in the same order.
The kernels choose nothing: :mod:`halrp_fast._backend` offers them as the ``cpp`` (CPU) and ``cuda_ext`` (CUDA)
providers and alone decides, per call, who serves — the same on the eager path, through ``torch.ops.halrp`` and
under ``torch.compile``.  ``HALRP_FAST_NO_EXT=1`` keeps the library from loading at all.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch

NO_EXT_VAR = "HALRP_FAST_NO_EXT"
_NAMESPACE = "_halrp_C"
#: the compiled kernel of each halrp op, per device type
KERNELS = {
    "cpu": {"perturbed_linear": "linear_cpu", "perturbed_linear_backward": "linear_backward_cpu",
            "perturbed_linear_mt": "linear_mt_cpu", "perturbed_conv2d_mt": "conv2d_mt_cpu",
            "fit_scalings": "fit_scalings_cpu"},
    "cuda": {"perturbed_linear_mt": "linear_mt_cuda"},
}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
#: kernels that are a whole eager call with its autograd (forward and backward by the kernels above), offered to
#: the eager path as "<op>:autograd" (see halrp_fast.ops.apply)
AUTOGRAD_KERNELS = {"cpu": {"perturbed_linear": "linear_autograd_cpu"}}

_state: dict[str, object] = {}


def _disabled() -> bool:
    return os.environ.get(NO_EXT_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def load() -> str | None:
    """Import ``halrp_fast._C`` once; ``None`` when it is loaded, else the reason it is not."""
    if "why" not in _state:
        why = None
        if _disabled():
            why = f"disabled by {NO_EXT_VAR}=1"
        else:
            try:
                importlib.import_module("halrp_fast._C")
            except ModuleNotFoundError as exc:
                if exc.name != "halrp_fast._C":
                    raise
                why = ("not built (reinstall from source with torch importable: "
                       "pip install --no-build-isolation -e .)")
            except (ImportError, OSError, RuntimeError) as exc:
                why = f"failed to load ({type(exc).__name__}: {exc}); rebuild it against torch {torch.__version__}"
        _state["why"] = why
    return _state["why"]  # type: ignore[return-value]


def has_kernel(op: str, device_type: str) -> bool:
    """True when the extension is loaded and holds a kernel of ``halrp::op`` for ``device_type`` tensors."""
    name = KERNELS.get(device_type, {}).get(op)
    if name is None or load() is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{name}", _DISPATCH_KEYS[device_type])
    except RuntimeError:  # the op is not registered at all (the extension was built without that device)
        return False


def provider_impls(device_type: str) -> dict[str, Callable]:
    """``{halrp op: compiled kernel}`` for ``device_type`` tensors (each called straight at its dispatch key, with
    the op's arguments); raises ``ImportError`` saying why when there are none."""
    why = load()
    if why is not None:
        raise ImportError(f"halrp_fast._C {why}")
    key = getattr(torch._C.DispatchKey, _DISPATCH_KEYS[device_type])
    impls = {op: functools.partial(getattr(torch.ops._halrp_C, name).default._op_dk, key)
             for op, name in KERNELS.get(device_type, {}).items() if has_kernel(op, device_type)}
    if not impls:
        raise ImportError(f"halrp_fast._C was built without {device_type} kernels")
    autograd_key = getattr(torch._C.DispatchKey, "Autograd" + _DISPATCH_KEYS[device_type])
    for op, name in AUTOGRAD_KERNELS.get(device_type, {}).items():
        if op in impls and hasattr(torch.ops._halrp_C, name):
            impls[f"{op}:autograd"] = functools.partial(getattr(torch.ops._halrp_C, name).default._op_dk, autograd_key)
    return impls
