"""The compiled extension ``halrp_fast._C``: loading it, and saying why it is absent.

Importing ``halrp_fast._C`` loads a shared library that registers each compiled kernel as a private op of its
own, ``torch.ops._halrp_C.<kernel>``, taking the arguments of the ``halrp`` op it serves in the same order.  A
kernel's name says what it serves (:func:`kernel_name`: ``linear_mt_cpu`` serves ``perturbed_linear_mt`` on CPU
tensors), and its schema, written again in C++ where it is registered, is checked against the op table's when the
provider loads: a kernel whose arguments differ in name, type or order makes the provider unavailable, naming it.
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

from ._optable import AUTOGRAD_SCHEMAS, OPS, SCHEMAS

NO_EXT_VAR = "HALRP_FAST_NO_EXT"
_NAMESPACE = "_halrp_C"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def kernel_name(op: str, device_type: str, autograd: bool = False) -> str:
    """The compiled kernel serving ``halrp::op`` on ``device_type`` tensors (``autograd``: the kernel that is a whole
    eager call of the forward op with its autograd, offered to the eager path as ``"<op>:autograd"``; see
    :func:`halrp_fast.ops.apply`)."""
    base = op.removeprefix("perturbed_")
    return f"{base}_autograd_{device_type}" if autograd else f"{base}_{device_type}"


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


def has_kernel(op: str, device_type: str, autograd: bool = False) -> bool:
    """True when the extension is loaded and holds a kernel of ``halrp::op`` for ``device_type`` tensors."""
    if device_type not in _DISPATCH_KEYS or load() is not None:
        return False
    key = ("Autograd" if autograd else "") + _DISPATCH_KEYS[device_type]
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{kernel_name(op, device_type, autograd)}",
                                                              key)
    except RuntimeError:  # the op is not registered at all (the extension was built without that device)
        return False


def compiled_kernels() -> list[str]:
    """Every kernel the loaded extension registers (``[]`` when it is not loaded)."""
    if load() is not None:
        return []
    prefix = f"{_NAMESPACE}::"
    return sorted(n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def schema_mismatch(schema: torch.FunctionSchema, expected: str) -> str | None:
    """``None`` when a kernel's registered ``schema`` takes and returns what ``expected`` (an op table schema,
    without the name) states, argument for argument; else both signatures."""
    got = str(schema).split("(", 1)[1]
    want = str(torch._C.parse_schema(f"{schema.name}{expected}")).split("(", 1)[1]
    return None if got == want else f"{schema.name}({got} registered, the op table says ({want}"


def expected_schema(kernel: str) -> str | None:
    """The op table's schema for a kernel of the extension, from its name (``None``: the name serves no op)."""
    for device_type in _DISPATCH_KEYS:
        for op in OPS:
            if kernel == kernel_name(op, device_type):
                return SCHEMAS[op]
            if op in AUTOGRAD_SCHEMAS and kernel == kernel_name(op, device_type, autograd=True):
                return AUTOGRAD_SCHEMAS[op]
    return None


def provider_impls(device_type: str) -> dict[str, Callable]:
    """``{halrp op: compiled kernel}`` for ``device_type`` tensors (each called straight at its dispatch key, with
    the op's arguments); raises ``ImportError`` saying why when there are none, or when a kernel's schema differs
    from its op's."""
    why = load()
    if why is not None:
        raise ImportError(f"halrp_fast._C {why}")
    namespace = getattr(torch.ops, _NAMESPACE)
    names = {op: kernel_name(op, device_type) for op in OPS if has_kernel(op, device_type)}
    names.update({f"{op}:autograd": kernel_name(op, device_type, autograd=True) for op in AUTOGRAD_SCHEMAS
                  if op in names and has_kernel(op, device_type, autograd=True)})
    if not names:
        raise ImportError(f"halrp_fast._C was built without {device_type} kernels")
    wrong = [m for m in (schema_mismatch(getattr(namespace, k).default._schema, expected_schema(k))
                         for k in names.values()) if m is not None]
    if wrong:
        raise ImportError(f"halrp_fast._C does not match this halrp_fast (rebuild it): {'; '.join(wrong)}")
    key = getattr(torch._C.DispatchKey, _DISPATCH_KEYS[device_type])
    autograd_key = getattr(torch._C.DispatchKey, "Autograd" + _DISPATCH_KEYS[device_type])
    return {op: functools.partial(getattr(namespace, name).default._op_dk, autograd_key if ":" in op else key)
            for op, name in names.items()}
