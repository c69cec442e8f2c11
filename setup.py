"""Build script for halrp_fast.

Package metadata lives in pyproject.toml.  This file exists for what pyproject.toml cannot say:

* the top-level ``kernels/`` folder (Triton sources) installs as ``halrp_fast.kernels``;
* the compiled extension ``halrp_fast._C`` (sources in ``csrc/``), built with
  ``torch.utils.cpp_extension`` and ninja when torch is importable at build time (install with
  ``--no-build-isolation``).  Its C++ CPU kernels are always built; the CUDA kernels in ``csrc/cuda/``
  only when torch is a CUDA build and a CUDA toolkit is found.

The C++ standard is torch's own (its BuildExtension adds the ``-std=`` its headers need: C++20 for torch 2.13 and
2.14).  With a CUDA build of torch and a CUDA toolkit the CUDA kernels are built too, for the GPUs named in
``TORCH_CUDA_ARCH_LIST`` or, when none is named and no GPU is visible, for sm_80 and sm_90 (Ampere, Hopper).

Environment: ``HALRP_FAST_NO_EXT=1`` skips the extension (the package then runs on its Python and Triton paths;
``halrp-fast env`` says why the extension is absent); ``HALRP_FAST_FORCE_CUDA=1`` makes a missing CUDA toolkit
(or a CPU build of torch) an error instead of a CPU-only build.  A compiler error is an installation error: it
names the failure and the variable that skips the extension.
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
    _find_cuda_toolkit()  # before torch.utils.cpp_extension reads CUDA_HOME
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
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp" if openmp else "-fopenmp-simd"]
    link = ["-fopenmp"] if openmp else []
    include_dirs = [os.path.join(here, "csrc")]
    if with_cuda:
        _default_cuda_archs(torch)
        ext = cpp_extension.CUDAExtension(
            "halrp_fast._C", sources + cuda_sources, include_dirs=include_dirs,
            define_macros=[("HALRP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("halrp_fast._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": _loud_build(cpp_extension.BuildExtension)}


def _find_cuda_toolkit() -> None:
    """Set ``CUDA_HOME`` from nvcc itself when it is unset: torch takes the parent of the ``nvcc`` found on PATH,
    which is wrong for a wrapper script (``/usr/local/bin/nvcc`` → no ``/usr/local/lib64/libcudart.so``)."""
    import shutil
    import subprocess

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or shutil.which("nvcc") is None:
        return
    try:
        out = subprocess.run(["nvcc", "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            os.environ["CUDA_HOME"] = os.path.normpath(line.split("=", 1)[1].strip())
            return


def _default_cuda_archs(torch) -> None:
    """Without a visible GPU torch cannot detect the architecture to build for: name Ampere and Hopper."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


def cpp_extension_ninja() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


def _loud_build(base):
    """``base`` (torch's BuildExtension, with ninja when installed) whose failure names itself and the way to
    install without the extension."""

    class BuildExt(base):
        def __init__(self, *args, **kwargs):
            # ninja compiles the sources in parallel; without it the build is serial but still works
            super().__init__(*args, use_ninja=cpp_extension_ninja(), **kwargs)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler and ninja failures surface as several exception types
                raise RuntimeError(f"building {ext.name} failed ({type(exc).__name__}: {exc}). Fix the compiler "
                                   f"error above, or install without the compiled kernels: HALRP_FAST_NO_EXT=1 pip "
                                   f"install ...") from exc

    return BuildExt


ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir={"halrp_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
