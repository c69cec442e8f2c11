"""Every Triton kernel of the library compiled ahead of time for Ampere (sm_80) and Hopper (sm_90a), no GPU needed.

For each kernel, each configuration its launcher can pick (shape bucket × dtype × flags: single/mixed task,
fused/unfused rank, save, ...), ``triton.compile(ASTSource(...), target=GPUTarget(...))`` builds the cubin; the
resource usage comes from ``cuobjdump --dump-resource-usage`` (registers, stack = spilled registers, local memory)
and the compiler's shared-memory size, the instruction mix from ``nvdisasm`` (HGMMA: Hopper's warpgroup MMA, HMMA:
the mma.sync tensor-core op, FFMA: fp32 FMAs).  Integer arguments are compiled without the launch-time divisibility
hints (a lower bound on vectorisation; resources are those of the generic specialisation).

    python bench/kernel_resources.py [--arch sm_80 sm_90a] [--json out.json] [--quick]

prints a markdown table; ``tests/test_kernels_compile.py`` asserts the properties on the same configurations.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: opt-in shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90)
SHARED_LIMIT = {"sm_80": 166912, "sm_90a": 232448}
ARCHS = {"sm_80": 80, "sm_90a": 90}
DTYPES = ("fp32", "fp16", "bf16")
_TORCH = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Config:
    """One launch configuration: the kernel, its constexprs and the pointer element types."""

    kernel: str
    label: str
    dtype: str
    constexprs: dict
    pointers: dict  # pointer argument → element type ("fp16", "fp32", "i64", ...)
    num_warps: int = 4
    num_stages: int = 3
    has_dot: bool = True  # whether the configuration runs a tl.dot on dtype-typed operands


@dataclass
class Resources:
    kernel: str
    label: str
    dtype: str
    arch: str
    registers: int
    stack: int
    local: int
    shared: int
    hgmma: int
    hmma: int
    ffma: int
    has_dot: bool
    problems: list[str] = field(default_factory=list)


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


# ------------------------------------------------------------------------------------------------
# the configurations each launcher can pick
# ------------------------------------------------------------------------------------------------
def _linear_grid(quick: bool):
    """The launch choices shared by the linear forward and dgrad: ``(dtype, M, rank, mixed, fused, blocks, warps,
    label prefix)`` for M buckets 1 / 48 / 4096 rows × rank none / fused / unfused × single / mixed task."""
    import torch

    from kernels.perturbed_linear import fused_rank_max, linear_blocks, linear_warps

    for dtype in DTYPES:
        for m in (1, 48, 4096):
            for rank in ((8, 96) if quick else (0, 8, 32, 96)):
                for mixed in (False, True):
                    fused = rank <= fused_rank_max(getattr(torch, _TORCH[dtype]))
                    blocks = linear_blocks(m, 512, 512, rank, fused)
                    prefix = f"M={m} rank={rank}{'' if fused else ' (unfused)'} {'mixed' if mixed else 'single'}"
                    yield dtype, rank, mixed, fused, blocks, linear_warps(blocks[0], mixed, fused), prefix


def _row_pointers(dtype: str, mixed: bool) -> dict:
    """The row-order and task-id pointers: int64 for a mixed batch, unused (the input's type) otherwise."""
    return dict(rows_ptr="i64" if mixed else dtype, tid_ptr="i64" if mixed else dtype)


def linear_configs(quick: bool = False) -> list[Config]:
    """The fused forward over :func:`_linear_grid`, with and without saving ``c`` and ``x V`` (``linear_blocks``
    picks the tiles)."""
    out = []
    for dtype, rank, mixed, fused, (bm, bn, bk, br), warps, prefix in _linear_grid(quick):
        for save in ((False,) if quick else (False, True)):
            consts = dict(HAS_TASKS=mixed, HAS_BIAS=True, HAS_RANK=rank > 0, FUSE_XV=fused, SAVE=save,
                          ALLOW_TF32=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br)
            ptrs = {n: dtype for n in ("x_ptr", "w_ptr", "r_ptr", "s_ptr", "u_ptr", "v_ptr", "b_ptr", "y_ptr",
                                       "c_ptr", "xv_out_ptr")}
            ptrs.update(_row_pointers(dtype, mixed), xv_ptr=dtype if fused else "fp32")
            label = f"{prefix}{' save' if save else ''} tiles {bm}x{bn}x{bk} R{br} w{warps}"
            out.append(Config("perturbed_linear_fwd", label, dtype, consts, ptrs, warps))
    return out


def dgrad_configs(quick: bool = False) -> list[Config]:
    """The backward dgrad over :func:`_linear_grid`, writing dx, gx and g U (tiles: the launcher's 32 × 64)."""
    out = []
    for dtype, rank, mixed, fused, (bm, _, _, br), warps, prefix in _linear_grid(quick):
        consts = dict(HAS_TASKS=mixed, HAS_RANK=rank > 0, FUSE_GU=fused, WRITE_DX=True, WRITE_GX=True,
                      WRITE_GU=rank > 0 and fused, ALLOW_TF32=False, BLOCK_M=bm, BLOCK_N=32, BLOCK_K=64, BLOCK_R=br)
        ptrs = {n: dtype for n in ("g_ptr", "w_ptr", "r_ptr", "s_ptr", "u_ptr", "v_ptr", "dx_ptr")}
        ptrs.update(_row_pointers(dtype, mixed), gu_in_ptr="fp32" if not fused else dtype, gx_ptr="fp32",
                    gu_out_ptr="fp32")
        out.append(Config("perturbed_linear_dgrad", f"{prefix} tiles {bm}x32x64 R{br} w{warps}", dtype, consts, ptrs,
                          warps))
    return out


def conv_configs(quick: bool = False) -> list[Config]:
    """The conv epilogue: channel/pixel tiles from small to the 64×64 cap × rank chunks × single/mixed."""
    from kernels._common import next_pow2

    out = []
    for dtype in DTYPES:
        for channels, pixels in ((16, 16), (64, 4096)) if quick else ((16, 16), (48, 49), (64, 4096)):
            for rank in (0, 8, 40):
                for mixed in (False, True):
                    bo, bp = min(64, max(16, next_pow2(channels))), min(64, max(16, next_pow2(pixels)))
                    br = min(32, max(16, next_pow2(rank)))
                    consts = dict(HAS_TASKS=mixed, HAS_BIAS=True, HAS_RANK=rank > 0, ALLOW_TF32=False,
                                  BLOCK_O=bo, BLOCK_P=bp, BLOCK_R=br)
                    ptrs = {n: dtype for n in ("c_ptr", "p_ptr", "r_ptr", "u_ptr", "b_ptr", "y_ptr")}
                    ptrs["tid_ptr"] = "i64" if mixed else dtype
                    kind = "mixed" if mixed else "single"
                    label = f"C={channels} HW={pixels} rank={rank} {kind} tiles {bo}x{bp} R{br}"
                    out.append(Config("conv_epilogue", label, dtype, consts, ptrs, has_dot=rank > 0))
    return out


def all_configs(quick: bool = False, dtypes=DTYPES) -> list[Config]:
    return [c for c in linear_configs(quick) + dgrad_configs(quick) + conv_configs(quick) if c.dtype in dtypes]


def _kernel(name: str):
    if name == "perturbed_linear_fwd":
        from kernels.perturbed_linear import _perturbed_linear_fwd_kernel as k
    elif name == "perturbed_linear_dgrad":
        from kernels.perturbed_linear_backward import _perturbed_linear_dgrad_kernel as k
    else:
        from kernels.perturbed_conv2d import _conv_epilogue_kernel as k
    return k


# ------------------------------------------------------------------------------------------------
# compile and inspect
# ------------------------------------------------------------------------------------------------
def compile_config(cfg: Config, arch: str, workdir: Path) -> Resources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernel(cfg.kernel)
    names = kernel.arg_names
    signature = {}
    for n in names:
        if n in cfg.constexprs:
            signature[n] = "constexpr"
        elif n.endswith("_ptr"):
            signature[n] = "*" + cfg.pointers[n]
        else:
            signature[n] = "i32"
    constexprs = {(names.index(n),): v for n, v in cfg.constexprs.items()}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", ARCHS[arch], 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    cubin = workdir / f"{cfg.kernel}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    sass = subprocess.run([_tool("nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    res = Resources(cfg.kernel, cfg.label, cfg.dtype, arch, int(fields.get("REG", 0)), int(fields.get("STACK", 0)),
                    int(fields.get("LOCAL", 0)), int(compiled.metadata.shared) + int(fields.get("SHARED", 0)),
                    len(re.findall(r"\bHGMMA\b|\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass)),
                    len(re.findall(r"\bFFMA\b", sass)), cfg.has_dot)
    res.problems = problems(res)
    return res


def problems(r: Resources) -> list[str]:
    """What a configuration violates: spills, shared memory over the target's limit, an fp16/bf16 dot without
    tensor-core instructions."""
    out = []
    if r.stack or r.local:
        out.append(f"spills ({r.stack} B stack, {r.local} B local)")
    if r.shared > SHARED_LIMIT[r.arch]:
        out.append(f"shared memory {r.shared} B > {SHARED_LIMIT[r.arch]} B")
    if r.has_dot and r.dtype in ("fp16", "bf16") and r.hgmma + r.hmma == 0:
        out.append("fp16/bf16 dot without tensor-core instructions")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--json", default=None, help="write every row as JSON here")
    ap.add_argument("--quick", action="store_true", help="a covering subset (the CI test's)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = ap.parse_args(argv)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in all_configs(args.quick, args.dtypes):
            for arch in args.arch:
                rows.append(compile_config(cfg, arch, Path(tmp)))
    print("| kernel | configuration | dtype | arch | regs | spill (stack B) | shared B | HGMMA | HMMA | FFMA | "
          "problems |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.kernel} | {r.label} | {r.dtype} | {r.arch} | {r.registers} | {r.stack + r.local} | {r.shared} | "
              f"{r.hgmma} | {r.hmma} | {r.ffma} | {'; '.join(r.problems) or '—'} |")
    bad = [r for r in rows if r.problems]
    print(f"\n{len(rows)} compiled, {len(bad)} with problems")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
