"""The compiled extension ``halrp_fast._C``: loading it, and saying why it is absent.

Importing ``halrp_fast._C`` loads a shared library whose ``TORCH_LIBRARY_IMPL`` blocks add C++ (and, when
built with CUDA, CUDA) kernels to the ``halrp`` ops defined in :mod:`halrp_fast.ops` — no second schema.
Each compiled kernel is routed per call by ``HALRP_FAST_BACKEND`` (``csrc/common.cpp``): it runs when the
compiled provider is wanted (CPU: ``auto`` or ``cpp``; CUDA: ``cuda_ext`` only) and otherwise hands the call
to the op's Python kernel, so the choice of provider is the same on the eager path, through ``torch.ops``
and under ``torch.compile``.  ``HALRP_FAST_NO_EXT=1`` keeps the library from loading at all.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch

NO_EXT_VAR = "HALRP_FAST_NO_EXT"
_NAMESPACE = "halrp"
# Forward conv ops take (…, B, save, stride, padding, dilation) in their schema but (…, B, stride, padding,
# dilation, save) as provider implementations (the convention of halrp_fast.reference).
_GEOMETRY_BEFORE_SAVE = ("perturbed_conv2d", "perturbed_conv2d_mt")

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
    """True when the extension registered a kernel of ``halrp::op`` for ``device_type`` tensors."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return load() is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{op}", key)


def provider_impls(device_type: str, ops: tuple[str, ...]) -> dict[str, Callable]:
    """``{op: implementation}`` of the compiled kernels for ``device_type`` (provider convention of
    :mod:`halrp_fast._backend`); raises ``ImportError`` saying why when there are none."""
    why = load()
    if why is not None:
        raise ImportError(f"halrp_fast._C {why}")
    key = getattr(torch._C.DispatchKey, {"cpu": "CPU", "cuda": "CUDA"}[device_type])
    impls = {}
    for op in ops:
        if not has_kernel(op, device_type):
            continue
        call = functools.partial(getattr(torch.ops.halrp, op).default._op_dk, key)
        impls[op] = _reorder_save(call) if op in _GEOMETRY_BEFORE_SAVE else call
    if not impls:
        raise ImportError(f"halrp_fast._C was built without {device_type} kernels")
    return impls


def _reorder_save(call: Callable) -> Callable:
    def run(*args):
        *head, stride, padding, dilation, save = args
        return call(*head, save, stride, padding, dilation)

    return run
