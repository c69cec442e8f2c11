"""Build script for halrp_fast.

Package metadata lives in pyproject.toml.  This file exists for what pyproject.toml cannot say:

* the top-level ``kernels/`` folder (Triton sources) installs as ``halrp_fast.kernels``;
* the compiled extension ``halrp_fast._C`` (sources in ``csrc/``), built with
  ``torch.utils.cpp_extension`` and ninja when torch is importable at build time (install with
  ``--no-build-isolation``).  Its C++ CPU kernels are always built; the CUDA kernels in ``csrc/cuda/``
  only when torch is a CUDA build and a CUDA toolkit is found.

Environment: ``HALRP_FAST_NO_EXT=1`` skips the extension; ``HALRP_FAST_FORCE_CUDA=1`` makes a missing CUDA
toolkit (or a CPU build of torch) an error instead of a CPU-only build.  Without the extension, or when it
fails to build, the package still installs and runs on its Python and Triton paths
(``halrp-fast env`` says why the extension is absent).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["halrp_fast", "halrp_fast.*"]) + ["halrp_fast.kernels"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    """``(ext_modules, cmdclass)`` for halrp_fast._C, or empty ones when it is not to be built."""
    if _flag("HALRP_FAST_NO_EXT"):
        return [], {}
    force_cuda = _flag("HALRP_FAST_FORCE_CUDA")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if force_cuda:
            raise RuntimeError("HALRP_FAST_FORCE_CUDA=1 but torch is not importable at build time "
                               "(install torch first and build with --no-build-isolation)") from None
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if force_cuda and not with_cuda:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        raise RuntimeError(f"HALRP_FAST_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    # at::parallel_for is a header template: it runs threads only in code compiled with OpenMP. torch's Linux
    # builds use libgomp (libgomp.so.1, which the loader shares with torch's copy); elsewhere only simd pragmas.
    openmp = sys.platform.startswith("linux") and torch.backends.openmp.is_available()
    cxx = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp" if openmp else "-fopenmp-simd"]
    link = ["-fopenmp"] if openmp else []
    include_dirs = [os.path.join(here, "csrc")]
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "halrp_fast._C", sources + cuda_sources, include_dirs=include_dirs,
            define_macros=[("HALRP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
            extra_link_args=link, optional=not force_cuda,
        )
    else:
        ext = cpp_extension.CppExtension("halrp_fast._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=link, optional=True)
    return [ext], {"build_ext": _optional_build(cpp_extension.BuildExtension, required=force_cuda)}


def cpp_extension_ninja() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


def _optional_build(base, required: bool):
    """``base`` (torch's BuildExtension, with ninja when installed) that warns instead of failing when the
    extension does not compile, unless ``required``: the package then installs without it."""

    class BuildExt(base):
        def __init__(self, *args, **kwargs):
            # ninja compiles the sources in parallel; without it the build is serial but still works
            super().__init__(*args, use_ninja=cpp_extension_ninja(), **kwargs)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler and ninja failures surface as several exception types
                if required:
                    raise
                self.warn(f"{ext.name} was not built ({type(exc).__name__}: {exc}); halrp_fast installs without "
                          "its compiled kernels (halrp-fast env says so)")

    return BuildExt


ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir={"halrp_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
