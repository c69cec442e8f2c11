"""The CUDA sources of halrp_fast._C compile with the machine's nvcc for sm_80 and sm_90 (compile only: running them
needs a GPU), and ptxas reports no stack frame and no register spills in any kernel (``-Xptxas -v``, the table of
``bench/cuda_resources.py``).  Skipped when nvcc is absent."""
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cuda_resources as cr  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")]


def test_there_are_cuda_sources():
    assert cr.SOURCES, "csrc/cuda/*.cu not found"


@pytest.mark.parametrize("arch", cr.ARCHS)
@pytest.mark.parametrize("source", cr.SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_without_spills(source, arch, tmp_path):
    kernels = cr.compile_source(source, arch, tmp_path)
    assert kernels, f"ptxas reported no kernel for {source.name}"
    spilled = [k for k in kernels if k.stack or k.spill_stores or k.spill_loads]
    assert not spilled, "\n".join(f"{k.kernel}: {k.registers} registers, {k.stack} B stack, "
                                  f"{k.spill_stores} B spill stores, {k.spill_loads} B spill loads" for k in spilled)


def test_ptxas_report_is_parsed():
    report = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem
"""
    (k,) = cr.parse_ptxas(report, "x.cu", "sm_90")
    assert (k.registers, k.stack, k.spill_stores, k.spill_loads, k.shared) == (40, 16, 8, 4, 256)
    assert k.kernel.startswith("foo")
