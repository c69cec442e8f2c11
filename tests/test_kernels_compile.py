"""Every Triton kernel, in the configurations its launcher picks, compiled ahead of time for sm_80 and sm_90a (no
GPU): no register spills, shared memory within the target's limit, tensor-core instructions in every bf16 and TF32
``tl.dot`` loop.  ``bench/kernel_resources.py`` compiles (in a subprocess: the suite runs the kernels under the
Triton interpreter, whose kernels cannot be compiled); here its covering subset in bfloat16, fp32 (FMA products) and
fp32 with TF32 allowed, the full table in bench/RESULTS.md.  A configuration that is known to miss a property is
listed below with its figures: the test then expects the miss (strictly), so fixing it, or a new miss, fails the
suite until this list is updated."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
# one pytest-xdist worker compiles them all (the fixture below is per worker; run with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("kernels_compile")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import kernel_resources as kr  # noqa: E402

DTYPES = ("bf16", "fp32", "tf32")
CONFIGS = kr.all_configs(quick=True, dtypes=DTYPES)
CASES = [(c, arch) for c in CONFIGS for arch in kr.ARCHS]

#: (kernel, label, dtype, arch) → the figures of a known spill (bench/RESULTS.md, "Triton kernels compiled for sm_80 and
#: sm_90a")
KNOWN_SPILLS: dict[tuple[str, str, str, str], str] = {}


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_resources.py"), "--quick", "--dtypes", *DTYPES,
                           "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return {(r["kernel"], r["label"], r["dtype"], r["arch"]): r for r in json.loads(out.read_text())}


def _case_id(case):
    cfg, arch = case
    return f"{cfg.kernel}-{cfg.dtype}-{arch}-{cfg.label}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_kernel_compiles_within_the_targets_limits(resources, case):
    cfg, arch = case
    r = resources[(cfg.kernel, cfg.label, cfg.dtype, arch)]
    assert r["shared"] <= kr.SHARED_LIMIT[arch], f"shared memory {r['shared']} B"
    if r["has_dot"] and cfg.dtype != "fp32":  # fp32 without TF32: IEEE products, FMA by design
        tensor_core = r["hgmma"] + r["hmma"]
        assert tensor_core > 0, f"{cfg.dtype} dot without tensor-core instructions ({r['ffma']} FFMA)"
    if arch == "sm_90a" and cfg.dtype == "bf16" and cfg.kernel != "conv_epilogue" and cfg.constexprs["BLOCK_M"] >= 64:
        assert r["hgmma"] > 0, "a compute-bound 64/128-row tile without Hopper's warpgroup MMA"
    if cfg.kernel != "conv_epilogue" and cfg.constexprs["BLOCK_M"] == 128:
        # the large tiles' main loop is software pipelined: asynchronous global→shared copies into (at least)
        # num_stages - 1 buffers of the row tile and the W tile (the reduction runs over K in the forward, over N in
        # the input gradient)
        c = cfg.constexprs
        forward = cfg.kernel == "perturbed_linear_fwd"
        reduce, out = (c["BLOCK_K"], c["BLOCK_N"]) if forward else (c["BLOCK_N"], c["BLOCK_K"])
        stage = (c["BLOCK_M"] + out) * reduce * (2 if cfg.dtype == "bf16" else 4)
        assert r["ldgsts"] > 0, "a 128-row tile whose main loop is not pipelined (no asynchronous copies)"
        assert r["shared"] >= (cfg.num_stages - 1) * stage, f"{r['shared']} B of shared memory: too few buffers"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_kernel_does_not_spill_registers(resources, case, request):
    cfg, arch = case
    known = KNOWN_SPILLS.get((cfg.kernel, cfg.label, cfg.dtype, arch))
    if known:
        request.applymarker(pytest.mark.xfail(reason=f"known spill: {known}", strict=True))
    r = resources[(cfg.kernel, cfg.label, cfg.dtype, arch)]
    assert r["stack"] == 0 and r["local"] == 0, (f"{r['registers']} registers, {r['stack']} B stack, "
                                                  f"{r['local']} B local")
