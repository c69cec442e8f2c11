"""The router: which provider serves each op on each device, and why.

Every call of an op of :mod:`halrp_fast.ops` — eager, through ``torch.ops.halrp`` or under ``torch.compile`` —
asks :func:`select` for its *provider*; nothing else chooses.  Providers: ``reference`` (the pure-PyTorch math
of :mod:`halrp_fast.reference`), ``triton`` (the kernels in ``kernels/``), ``cpp`` / ``cuda_ext`` (the compiled
kernels of :mod:`halrp_fast._ext`), and any provider registered with :func:`register_provider`.  They are loaded
lazily: an optional dependency is imported on the first call that could use it, never at ``import halrp_fast``.

The environment variable ``HALRP_FAST_BACKEND`` (read here only, by :func:`requested`, on every selection)
picks a provider for every op it implements (``auto`` — the default —, ``reference``, or any registered provider
name).  Forcing a provider is an explicit contract: an op or dtype it does not implement is served by what ``auto``
would choose, one :class:`ProviderFallbackWarning` per forced provider, device type and dtype names every such op
and who serves it, and :func:`env_report` shows each one.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from . import _optable, reference

ENV_VAR = "HALRP_FAST_BACKEND"

#: every op a provider may serve, from the op table
OPS = _optable.OPS


@dataclass
class Provider:
    """A family of kernels.

    ``load`` imports whatever the provider needs and returns ``{op name: implementation}``, or
    raises ``ImportError``/``RuntimeError`` whose message says why it cannot serve; it runs once.
    ``devices`` lists the device types (``"cpu"``, ``"cuda"``, ...) it serves; ``priority`` orders
    providers in ``auto`` mode (higher first); ``auto`` = False keeps it out of ``auto`` mode
    (it is then used only when named in ``HALRP_FAST_BACKEND``); ``auto_devices`` (default: all of
    ``devices``) limits the device types for which ``auto`` mode may pick it.  ``dtypes`` (default: all) names
    the floating-point types it computes (``"float32"``, ...); other dtypes go to the next provider, or to
    ``reference`` when it is named in ``HALRP_FAST_BACKEND``.
    """

    name: str
    devices: tuple[str, ...]
    load: Callable[[], dict[str, Callable]]
    priority: int = 0
    auto: bool = True
    auto_devices: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    _impls: dict[str, Callable] | None = field(default=None, repr=False)
    _error: str | None = field(default=None, repr=False)

    def impls(self) -> dict[str, Callable]:
        """The implementations, or ``{}`` when the provider cannot load (see :meth:`why_not`)."""
        if self._impls is None and self._error is None:
            try:
                self._impls = dict(self.load())
            except (ImportError, RuntimeError, OSError) as exc:
                self._error = f"{type(exc).__name__}: {exc}"
        return self._impls or {}

    def why_not(self) -> str | None:
        self.impls()
        return self._error


_PROVIDERS: dict[str, Provider] = {}
# (op, device type, dtype, raw HALRP_FAST_BACKEND) → (provider name, implementation)
_SELECTION: dict[tuple, tuple[str, Callable]] = {}
# (forced provider, device type, dtype) whose missing ops a ProviderFallbackWarning has named
_WARNED: set[tuple] = set()

def register_provider(provider: Provider) -> None:
    """Add (or replace) a provider; clears the selection cache (and which fallbacks were warned of)."""
    _PROVIDERS[provider.name] = provider
    _SELECTION.clear()
    _WARNED.clear()


register_provider(
    Provider(
        name="reference",
        devices=("*",),
        load=lambda: {op: getattr(reference, op) for op in OPS},
        priority=-100,
    )
)


#: the modules of kernels/ that hold Triton providers' functions, each named after the op it serves
TRITON_MODULES = ("perturbed_linear", "perturbed_linear_backward", "perturbed_conv2d")


def _load_triton() -> dict[str, Callable]:
    import importlib
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed (pip install triton)")
    modules = [importlib.import_module(f"{__package__}.kernels.{name}") for name in TRITON_MODULES]
    return {op: getattr(m, op) for op in OPS for m in modules if callable(getattr(m, op, None))}


# Triton kernels serve CUDA tensors; with TRITON_INTERPRET=1 (read at import, as Triton does) they also
# run on CPU tensors in the interpreter, but only when HALRP_FAST_BACKEND=triton asks for it.
register_provider(
    Provider(
        name="triton",
        devices=("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
        load=_load_triton,
        priority=10,
        auto_devices=("cuda",),
        # fp32 accumulators and tl.dot: float64 runs would lose their precision (or fail to compile)
        dtypes=("float32", "float16", "bfloat16"),
    )
)

# The compiled extension (halrp_fast._C): its C++ CPU kernels serve CPU tensors in auto mode; its CUDA kernels
# serve only when HALRP_FAST_BACKEND=cuda_ext names them (Triton is the measured default on CUDA).
def _load_compiled(device_type: str) -> dict[str, Callable]:
    from . import _ext

    return _ext.provider_impls(device_type)


register_provider(Provider(name="cpp", devices=("cpu",), load=lambda: _load_compiled("cpu"), priority=5))
register_provider(Provider(name="cuda_ext", devices=("cuda",), load=lambda: _load_compiled("cuda"), priority=5,
                           auto=False))


# os.environ's own mapping (encoded keys): a lookup there sees every change made through os.environ (and
# monkeypatch) at a tenth of the cost of os.environ.get, which matters on a path taken by every op call.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None


def _raw_request():
    if _ENV_KEY is not None:
        return _ENV_DATA.get(_ENV_KEY)
    return os.environ.get(ENV_VAR)


def requested() -> str:
    """The provider ``HALRP_FAST_BACKEND`` asks for (``"auto"`` when unset)."""
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return "auto"
    value = raw.strip().lower() or "auto"
    if value != "auto" and value not in _PROVIDERS:
        raise ValueError(
            f"{ENV_VAR}={value!r} names no provider; choose 'auto' or one of {sorted(_PROVIDERS)}"
        )
    return value


def _serves(p: Provider, device_type: str) -> bool:
    return "*" in p.devices or device_type in p.devices


def _computes(p: Provider, dtype: str | None) -> bool:
    return dtype is None or p.dtypes is None or dtype in p.dtypes


class ProviderFallbackWarning(UserWarning):
    """``HALRP_FAST_BACKEND`` names a provider that does not implement some ops (or dtypes) on a device type."""


def _choose(op: str, device_type: str, want: str, dtype: str | None) -> tuple[str, Callable]:
    if want != "auto":
        p = _PROVIDERS[want]
        if not _serves(p, device_type):
            raise RuntimeError(
                f"{ENV_VAR}={want} cannot serve {op} on {device_type} tensors (it serves {list(p.devices)})"
            )
        impls = p.impls()
        if not impls:
            raise RuntimeError(f"{ENV_VAR}={want} is not available: {p.why_not()}")
        if op in impls and _computes(p, dtype):
            return p.name, impls[op]
        _warn_fallbacks(p, device_type, dtype)
    return _choose_auto(op, device_type, dtype)


def _choose_auto(op: str, device_type: str, dtype: str | None) -> tuple[str, Callable]:
    for p in sorted(_PROVIDERS.values(), key=lambda p: -p.priority):
        auto_ok = p.auto and (p.auto_devices is None or device_type in p.auto_devices)
        if auto_ok and _serves(p, device_type) and _computes(p, dtype) and op in p.impls():
            return p.name, p.impls()[op]
    raise RuntimeError(f"no provider implements {op} on {device_type}")


def fallbacks(provider: str, device_type: str, dtype: str | None = None) -> dict[str, str]:
    """``{op: provider serving it}`` for every op that ``provider``, when forced by ``HALRP_FAST_BACKEND``, does not
    serve itself on ``device_type`` tensors of ``dtype`` (``None``: the dtypes it computes)."""
    p = _PROVIDERS[provider]
    impls = p.impls()
    return {op: _choose_auto(op, device_type, dtype)[0] for op in OPS
            if op not in impls or not _computes(p, dtype)}


def _warn_fallbacks(p: Provider, device_type: str, dtype: str | None) -> None:
    key = (p.name, device_type, dtype)
    if key in _WARNED:
        return
    _WARNED.add(key)
    import warnings

    served = fallbacks(p.name, device_type, dtype)
    what = ", ".join(f"{op} -> {who}" for op, who in served.items())
    of_dtype = f" in {dtype}" if dtype is not None else ""
    warnings.warn(f"{ENV_VAR}={p.name} does not implement {len(served)} op(s) on {device_type} tensors{of_dtype}; "
                  f"served instead as auto mode chooses: {what}", ProviderFallbackWarning, stacklevel=4)


def select(op: str, device_type: str, dtype=None) -> tuple[str, Callable]:
    """``(provider name, implementation)`` serving ``op`` for tensors of ``device_type`` and floating-point type
    ``dtype`` (a ``torch.dtype`` or its name such as ``"float64"``; ``None``: any)."""
    key = (op, device_type, dtype, _raw_request())
    hit = _SELECTION.get(key)
    if hit is None:
        hit = _SELECTION[key] = _choose(op, device_type, requested(), dtype if dtype is None else dtype_name(dtype))
    return hit


def select_autograd(op: str, device_type: str, dtype) -> Callable | None:
    """The provider's own autograd of a whole eager call of ``op`` (``"<op>:autograd"``: forward and backward by
    the same kernels as its ``op`` and ``op_backward``), when the provider serving ``op`` also serves its backward
    and offers one; else ``None`` (the eager path then wraps the two in a Python autograd function)."""
    key = (f"{op}:autograd", device_type, dtype, _raw_request())
    if key not in _SELECTION:
        name, _ = select(op, device_type, dtype)
        same = select(f"{op}_backward", device_type, dtype)[0] == name
        _SELECTION[key] = (name, _PROVIDERS[name].impls().get(f"{op}:autograd") if same else None)
    return _SELECTION[key][1]


def dtype_name(dtype) -> str:
    """``"float32"`` for ``torch.float32``, a float32 tensor or the name itself (the names :attr:`Provider.dtypes`
    uses)."""
    if isinstance(dtype, str):
        return dtype
    return str(getattr(dtype, "dtype", dtype)).removeprefix("torch.")


def env_report(devices: tuple[str, ...] | None = None) -> str:
    """A human-readable table: for each op and device type, the provider serving it and why."""
    import torch

    from .cpu_allocator import cpu_allocator_state

    if devices is None:
        devices = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())
    lines = [
        f"halrp_fast env report  (torch {torch.__version__}, {ENV_VAR}={os.environ.get(ENV_VAR, 'auto')}, "
        f"cuda available: {torch.cuda.is_available()})",
        f"cpu allocator: {cpu_allocator_state()}",
        "providers:",
    ]
    for p in sorted(_PROVIDERS.values(), key=lambda p: -p.priority):
        why = p.why_not()
        state = "available" if why is None else f"unavailable ({why})"
        dtypes = f" dtypes={','.join(p.dtypes)}" if p.dtypes else ""
        lines.append(f"  {p.name:<10} devices={','.join(p.devices):<10} {state}{dtypes}")
    lines.append("ops:")
    try:
        want = requested()
    except ValueError:
        want = "auto"  # each op's line below says what is wrong
    for dev in devices:
        p = _PROVIDERS.get(want)
        forced = p is not None and want != "auto" and _serves(p, dev) and p.why_not() is None
        missing = fallbacks(want, dev) if forced else {}
        for op in OPS:
            try:
                name, _ = select(op, dev)
            except (RuntimeError, ValueError) as exc:
                name = f"error: {exc}"
            note = f"  (fallback: {ENV_VAR}={want} does not implement it)" if op in missing else ""
            lines.append(f"  {op:<30} {dev:<5} -> {name}{note}")
    return "\n".join(lines)
