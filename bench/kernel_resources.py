"""Every Triton kernel of the library compiled ahead of time for Ampere (sm_80) and Hopper (sm_90a), no GPU needed.

For each kernel, each configuration its launcher can pick (shape bucket × dtype × flags: single/mixed task,
fused/unfused rank, save, ...) is the launcher's own launch, captured on CPU tensors of the bucket's shapes (N = K =
512) and compiled with Triton's launch-time specialisation (16-byte-aligned pointers and integers divisible by 16
marked as such, integers equal to 1 made constants: what a launch on such tensors compiles, and what lets Triton
vectorise loads and pipeline them through shared memory); ``triton.compile(ASTSource(...), target=GPUTarget(...))``
builds the cubin; the resource usage comes from ``cuobjdump --dump-resource-usage`` (registers, stack = spilled
registers, local memory) and the compiler's shared-memory size, the instruction mix from ``nvdisasm`` (HGMMA: Hopper's
warpgroup MMA, HMMA: the mma.sync tensor-core op, LDGSTS: asynchronous global→shared copies of a pipelined loop,
FFMA: fp32 FMAs).

    python bench/kernel_resources.py [--arch sm_80 sm_90a] [--json out.json] [--quick]

prints a markdown table; ``tests/test_kernels_compile.py`` asserts the properties on the same configurations.
"""
from __future__ import annotations

import argparse
import inspect
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
#: input types; "tf32": fp32 tensors with ``torch.backends.cuda.matmul.allow_tf32`` set (tensor-core products)
DTYPES = ("fp32", "tf32", "fp16", "bf16")
_TORCH = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Config:
    """One launch as its launcher makes it: the kernel, the Triton signature with the launch-time specialisation
    (pointers and integers divisible by 16 marked, integers equal to 1 made constants), the constexprs by name and
    the launch options."""

    kernel: str
    label: str
    dtype: str
    signature: dict  # argument name → Triton type ("*bf16", "i32", "constexpr")
    constexprs: dict  # argument name → value (the kernel's constexprs and the arguments specialised to 1)
    divisible: list  # names of the arguments specialised as divisible by 16
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
    ldgsts: int
    ffma: int
    has_dot: bool
    problems: list[str] = field(default_factory=list)


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


# ------------------------------------------------------------------------------------------------
# the configurations each launcher can pick: its launches captured on CPU tensors of each shape bucket
# ------------------------------------------------------------------------------------------------
class _Capture:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _launches(module, attr: str, call, dtype: str) -> list[tuple[tuple, dict]]:
    """The launches of ``module.attr`` made by ``call()`` for inputs of ``dtype`` (nothing runs)."""
    import torch

    capture = _Capture(getattr(module, attr))
    setattr(module, attr, capture)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        call()
    finally:
        setattr(module, attr, capture.kernel)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return capture.calls


def _config(kernel_name: str, kernel, label: str, dtype: str, args: tuple, kwargs: dict) -> Config:
    """The compile request Triton's launcher makes for ``kernel[grid](*args, **kwargs)`` (its own specialisation
    rule: tensors' 16-byte alignment, integers divisible by 16, integers equal to 1)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = dict(zip(kernel.arg_names, args, strict=False)) | {k: v for k, v in kwargs.items()
                                                                 if k in kernel.arg_names}
    signature, constexprs, divisible = {}, {}, []
    # the parameters from the Python function (also under TRITON_INTERPRET, where the kernel is interpreted)
    for name, param in inspect.signature(kernel.fn).parameters.items():
        value = values[name]
        if "constexpr" in str(param.annotation):
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = key
        elif key == "D":
            divisible.append(name)
    warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
    blocks = "x".join(str(constexprs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_O", "BLOCK_P")
                      if b in constexprs)
    label = f"{label} tiles {blocks} R{constexprs['BLOCK_R']} w{warps} s{stages}"
    has_dot = kernel_name != "conv_epilogue" or bool(constexprs["HAS_RANK"])
    return Config(kernel_name, label, dtype, signature, constexprs, divisible, warps, stages, has_dot)


def _linear_inputs(dtype: str, m: int, rank: int, mixed: bool, nk: int = 512, tasks: int = 3):
    """CPU tensors of one linear launch: ``(x, W, R, S, U, V, B, task_ids)`` (banks when ``mixed``)."""
    import torch

    dt = getattr(torch, _TORCH[dtype])
    lead = (tasks,) if mixed else ()
    x, W = torch.zeros(m, nk, dtype=dt), torch.zeros(nk, nk, dtype=dt)
    R, S, B = (torch.zeros(*lead, nk, dtype=dt) for _ in range(3))
    U, V = torch.zeros(*lead, nk, rank, dtype=dt), torch.zeros(*lead, nk, rank, dtype=dt)
    ids = torch.arange(m) % tasks if mixed else None
    return x, W, R, S, U, V, B, ids


#: the shape buckets of the linear launchers (rows M; N = K = 512) and the ranks (none, fused, unfused)
LINEAR_ROWS = (1, 48, 256, 4096)
LINEAR_RANKS = (0, 8, 32, 96)


def _linear_grid(quick: bool, rows=LINEAR_ROWS):
    for dtype in DTYPES:
        for m in rows:
            for rank in ((8, 96) if quick else LINEAR_RANKS):
                for mixed in (False, True):
                    yield dtype, m, rank, mixed, f"M={m} rank={rank} {'mixed' if mixed else 'single'}"


def linear_configs(quick: bool = False, rows=LINEAR_ROWS) -> list[Config]:
    """The forward's launches over :func:`_linear_grid`, with and without saving ``c`` and ``x V``."""
    from halrp_fast.kernels import perturbed_linear as mod

    out = []
    for dtype, m, rank, mixed, prefix in _linear_grid(quick, rows):
        x, W, R, S, U, V, B, ids = _linear_inputs(dtype, m, rank, mixed)
        for save in ((False,) if quick else (False, True)):
            for args, kwargs in _launches(mod, "_perturbed_linear_fwd_kernel", lambda: mod.perturbed_linear_fwd(
                    x, W, R, S, U, V, B, task_ids=ids, save=save), dtype):
                fused = "" if kwargs["FUSE_XV"] or not rank else " (unfused)"
                out.append(_config("perturbed_linear_fwd", mod._perturbed_linear_fwd_kernel,
                                   f"{prefix}{fused}{' save' if save else ''}", dtype, args, kwargs))
    return out


def dgrad_configs(quick: bool = False, rows=LINEAR_ROWS) -> list[Config]:
    """The backward's dgrad launches over :func:`_linear_grid`, writing dx, gx and g U."""
    import torch
    from halrp_fast.kernels import perturbed_linear_backward as mod

    out = []
    for dtype, m, rank, mixed, prefix in _linear_grid(quick, rows):
        x, W, R, S, U, V, B, ids = _linear_inputs(dtype, m, rank, mixed)
        needs = [True, False, False, True, False, True, False]
        empty = x.new_empty(0)
        def call(x=x, W=W, R=R, S=S, U=U, V=V, ids=ids, empty=empty):
            mod.perturbed_linear_bwd(torch.zeros_like(x), x, W, R, S, U, V, empty, empty, True, needs, task_ids=ids)

        for args, kwargs in _launches(mod, "_perturbed_linear_dgrad_kernel", call, dtype):
            fused = "" if kwargs["FUSE_GU"] or not rank else " (unfused)"
            out.append(_config("perturbed_linear_dgrad", mod._perturbed_linear_dgrad_kernel, f"{prefix}{fused}",
                               dtype, args, kwargs))
    return out


def conv_configs(quick: bool = False) -> list[Config]:
    """The conv epilogue's launches: channel/pixel tiles from small to the 64×64 cap × ranks × single/mixed."""
    import torch
    from halrp_fast.kernels import perturbed_conv2d as mod

    out = []
    for dtype in DTYPES:
        dt = getattr(torch, _TORCH[dtype])
        for channels, pixels in ((16, 16), (64, 4096)) if quick else ((16, 16), (48, 49), (64, 4096)):
            for rank in (0, 8, 40):
                for mixed in (False, True):
                    lead = (3,) if mixed else ()
                    c = torch.zeros(2, channels, pixels, 1, dtype=dt)
                    pooled = torch.zeros(2, rank, pixels, 1, dtype=dt)
                    R, B = torch.zeros(*lead, channels, dtype=dt), torch.zeros(*lead, channels, dtype=dt)
                    U = torch.zeros(*lead, channels, rank, dtype=dt)
                    ids = torch.tensor([0, 2]) if mixed else None
                    label = f"C={channels} HW={pixels} rank={rank} {'mixed' if mixed else 'single'}"
                    for args, kwargs in _launches(mod, "_conv_epilogue_kernel",
                                                  lambda: mod.conv_epilogue(c, pooled, R, U, B, task_ids=ids), dtype):
                        out.append(_config("conv_epilogue", mod._conv_epilogue_kernel, label, dtype, args, kwargs))
    return out


def all_configs(quick: bool = False, dtypes=DTYPES, rows=LINEAR_ROWS, conv: bool = True) -> list[Config]:
    """Every launch configuration (``rows``: the linear launchers' row buckets; ``conv``: with the conv epilogue's)."""
    configs = linear_configs(quick, rows) + dgrad_configs(quick, rows) + (conv_configs(quick) if conv else [])
    return [c for c in configs if c.dtype in dtypes]


def _kernel(name: str):
    if name == "perturbed_linear_fwd":
        from halrp_fast.kernels.perturbed_linear import _perturbed_linear_fwd_kernel as k
    elif name == "perturbed_linear_dgrad":
        from halrp_fast.kernels.perturbed_linear_backward import _perturbed_linear_dgrad_kernel as k
    else:
        from halrp_fast.kernels.perturbed_conv2d import _conv_epilogue_kernel as k
    return k


# ------------------------------------------------------------------------------------------------
# compile and inspect
# ------------------------------------------------------------------------------------------------
def compile_config(cfg: Config, arch: str, workdir: Path) -> Resources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernel(cfg.kernel)
    index = {n: (i,) for i, n in enumerate(kernel.arg_names)}
    constexprs = {index[n]: v for n, v in cfg.constexprs.items()}
    attrs = {index[n]: [["tt.divisibility", 16]] for n in cfg.divisible}
    compiled = triton.compile(ASTSource(fn=kernel, signature=cfg.signature, constexprs=constexprs, attrs=attrs),
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
                    len(re.findall(r"\bLDGSTS\b", sass)), len(re.findall(r"\bFFMA\b", sass)), cfg.has_dot)
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
    if r.has_dot and r.dtype in ("tf32", "fp16", "bf16") and r.hgmma + r.hmma == 0:
        out.append(f"{r.dtype} dot without tensor-core instructions")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--json", default=None, help="write every row as JSON here")
    ap.add_argument("--quick", action="store_true", help="a covering subset (the CI test's)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--rows", nargs="+", type=int, default=list(LINEAR_ROWS),
                    help="row counts M whose linear launches to compile (each picks its bucket's tiles)")
    ap.add_argument("--no-conv", action="store_true", help="leave out the conv epilogue")
    args = ap.parse_args(argv)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in all_configs(args.quick, args.dtypes, tuple(args.rows), not args.no_conv):
            for arch in args.arch:
                rows.append(compile_config(cfg, arch, Path(tmp)))
    print("| kernel | configuration | dtype | arch | regs | spill (stack B) | shared B | HGMMA | HMMA | LDGSTS | FFMA "
          "| problems |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.kernel} | {r.label} | {r.dtype} | {r.arch} | {r.registers} | {r.stack + r.local} | {r.shared} | "
              f"{r.hgmma} | {r.hmma} | {r.ldgsts} | {r.ffma} | {'; '.join(r.problems) or '—'} |")
    bad = [r for r in rows if r.problems]
    print(f"\n{len(rows)} compiled, {len(bad)} with problems")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
