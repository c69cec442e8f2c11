"""Keep freed tensor memory in the process on CPU (glibc), so large buffers are reused instead of re-faulted.

PyTorch's CPU tensors come from ``malloc``.  glibc serves large requests with fresh ``mmap`` pages, or from the
top of its heap, which it returns to the kernel (``trim``) as soon as enough of it is free.  Either way the next
activation of the same size is new memory, and the first write to every 4 KiB page of it is a page fault: on
a LeNet forward of 128 images the BatchNorm and ReLU layers spent ~70 % of their time in those faults.
:func:`tune_cpu_allocator` turns both off (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 2 GiB): freed blocks stay
in the heap and the next tensor reuses them.  The cost is that the process keeps its peak memory instead of
returning it.  It changes the whole process's ``malloc`` from the call on, so it is opt-in for library users;
``halrp-fast run`` and the benchmarks apply it (``--cpu-allocator default`` leaves ``malloc`` as it is).

PyTorch's own tuning guide recommends an allocator with this behaviour (jemalloc, tcmalloc, preloaded); this
module gets it from glibc without installing anything.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1  # the largest trim threshold mallopt's int argument holds

_state = {"tuned": False, "why": "not requested"}

CHOICES = ("tuned", "default")  # the --cpu-allocator option


def tune_cpu_allocator() -> bool:
    """Make glibc ``malloc`` keep and reuse freed memory (see the module docstring).

    Returns ``True`` when applied (Linux with glibc), ``False`` elsewhere; :func:`cpu_allocator_state` says why.
    Calling it again is harmless.
    """
    if _state["tuned"]:
        return True
    libc_name, _ = platform.libc_ver()
    if platform.system() != "Linux" or libc_name != "glibc":
        _state["why"] = f"not glibc ({platform.system()}, {libc_name or 'unknown libc'}): malloc left as it is"
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1
    except (OSError, AttributeError) as exc:
        _state["why"] = f"mallopt unavailable ({exc})"
        return False
    _state.update(tuned=applied, why="glibc mallopt: no mmap, no trim" if applied else "mallopt refused")
    return applied


def cpu_allocator_state() -> str:
    """``"tuned (...)"`` or ``"default (...)"``, for reports."""
    return f"{'tuned' if _state['tuned'] else 'default'} ({_state['why']})"


def apply_choice(choice: str) -> bool:
    """The ``--cpu-allocator`` option of the CLI and the benchmarks: ``"tuned"`` or ``"default"``."""
    if choice not in CHOICES:
        raise ValueError(f"cpu allocator must be one of {CHOICES}, got {choice!r}")
    return tune_cpu_allocator() if choice == "tuned" else False


def add_option(parser) -> None:
    """Add ``--cpu-allocator tuned|default`` (``args.cpu_allocator``, default tuned) to an argparse parser; the
    CLI and the benchmarks pass its value to :func:`apply_choice`."""
    parser.add_argument("--cpu-allocator", dest="cpu_allocator", choices=list(CHOICES), default="tuned",
                        help="tuned: glibc malloc keeps freed memory for reuse instead of page-faulting fresh memory "
                        "for every large tensor (faster CPU runs, the process keeps its peak memory); default: leave "
                        "malloc as it is")
