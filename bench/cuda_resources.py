"""Every CUDA kernel of the compiled extension (``csrc/cuda/*.cu``) compiled for sm_80 and sm_90 with ptxas's resource
report (``-Xptxas -v``): registers, stack frame, spill stores/loads and shared memory per kernel instantiation.  No GPU
needed (nvcc only).

    python bench/cuda_resources.py [--arch sm_80 sm_90] [--json out.json]

``tests/test_cuda_sources.py`` compiles the same way and asserts no spills.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")


@dataclass
class KernelUsage:
    source: str
    arch: str
    kernel: str
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    shared: int


def nvcc_command(source: Path, arch: str, output: Path, verbose: bool = True) -> list[str]:
    """The compile command of one source: torch's C++ standard (C++20 from torch 2.14) and headers."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in [ROOT / "csrc", *include_paths(), sysconfig.get_paths()["include"]]]
    return [shutil.which("nvcc") or "nvcc", "-std=c++20", "-O3", f"-arch={arch}", "--expt-relaxed-constexpr",
            "-diag-suppress", "3306", "-DHALRP_WITH_CUDA", *(["-Xptxas", "-v"] if verbose else []), *includes,
            "-c", str(source), "-o", str(output)]


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return names
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.splitlines()
    return out if len(out) == len(names) else names


def parse_ptxas(report: str, source: str, arch: str) -> list[KernelUsage]:
    """The per-kernel figures of a ``-Xptxas -v`` report."""
    rows = []
    for block in re.split(r"ptxas info\s+: Compiling entry function ", report)[1:]:
        name = re.match(r"'([^']+)'", block).group(1)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        used = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", block)
        rows.append(KernelUsage(source, arch, name, int(used.group(1)), int(frame.group(1)), int(frame.group(2)),
                                int(frame.group(3)), int(used.group(2) or 0)))
    for row, pretty in zip(rows, _demangle([r.kernel for r in rows]), strict=True):
        row.kernel = re.sub(r"^void ", "", pretty.split("(")[0])  # the instantiation, without its parameter list
    return rows


def compile_source(source: Path, arch: str, workdir: Path) -> list[KernelUsage]:
    done = subprocess.run(nvcc_command(source, arch, workdir / f"{source.stem}.{arch}.o"), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for {arch}:\n{done.stderr[-4000:]}")
    return parse_ptxas(done.stderr + done.stdout, source.name, arch)


def main(argv=None) -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in SOURCES:
            for arch in args.arch:
                rows += compile_source(source, arch, Path(tmp))
    print("| source | arch | kernel | regs | stack B | spill stores B | spill loads B | shared B |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.source} | {r.arch} | `{r.kernel}` | {r.registers} | {r.stack} | {r.spill_stores} | "
              f"{r.spill_loads} | {r.shared} |")
    spilled = [r for r in rows if r.stack or r.spill_stores or r.spill_loads]
    print(f"\n{len(rows)} kernels compiled, {len(spilled)} with a stack frame or spills")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
