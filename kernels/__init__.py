"""Triton kernels of halrp_fast (installed as ``halrp_fast.kernels``).

Imported only by the provider that serves the ops with them (see ``halrp_fast._backend``), never at
``import halrp_fast``.

This folder is also importable as a top-level ``kernels`` wherever the repository root is on ``sys.path`` (``python
-m pytest`` or ``python`` started there put the working directory first), where it would shadow any installed
package of that name (transformers imports one).  Imported under that name it hands the name on: to the next
``kernels`` on ``sys.path``, or to none (``ModuleNotFoundError``), exactly as if this folder were not there.
"""
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if not (isinstance(p, str) and _os.path.abspath(p or _os.curdir) == _root)]
    _spec = _machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is None:
        del _sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds once this file has run
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        _sys.modules.pop(__name__, None)
        raise
