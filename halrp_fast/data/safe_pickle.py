"""Reading pickled data files without running code: only numpy arrays, dtypes and plain containers.

The CIFAR python archives are pickles, and a pickle can name any callable to run while loading.  This
unpickler resolves only the globals a pickled numpy array needs; anything else (``os.system``, a class of any
module, ...) stops the load with an error before it is called.
"""
from __future__ import annotations

import pickle
from pathlib import Path

#: the globals a pickled numpy array (protocols 2 to 5, numpy 1 and 2) and a Python-2 byte string refer to
ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a data file has no need of (only numpy "
                                     f"arrays and plain containers are read)")


def load(path: str | Path, what: str) -> object:
    """Unpickle the data file ``path`` (``what`` names it in errors) with :class:`RestrictedUnpickler`."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except MemoryError:  # a corrupted length field asks for more memory than there is
        raise ValueError(f"cannot read {what} {path}: it declares an object larger than memory (a corrupted or "
                         f"foreign file)") from None
    except Exception as exc:  # noqa: BLE001 — a corrupted stream fails anywhere in pickle or numpy, in any type
        raise ValueError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from None
