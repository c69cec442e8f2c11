"""The CUDA sources of halrp_fast._C compile with the machine's nvcc (compile only: running them needs a GPU, and
a CUDA build of torch to link against).  Skipped when nvcc is absent."""
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
SOURCES = sorted((Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))

pytestmark = [pytest.mark.slow, pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")]


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu not found"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, arch, tmp_path):
    from torch.utils.cpp_extension import include_paths

    csrc = source.parents[1]
    includes = [f"-I{p}" for p in [csrc, *include_paths(), sysconfig.get_paths()["include"]]]
    # the C++ standard torch's extension builds use (its headers need C++20 from torch 2.14)
    cmd = [NVCC, "-std=c++20", "-O3", f"-arch={arch}", "--expt-relaxed-constexpr", "-diag-suppress", "3306",
           "-DHALRP_WITH_CUDA", *includes, "-c", str(source), "-o", str(tmp_path / "out.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"[-6000:]
    assert (tmp_path / "out.o").stat().st_size > 0
