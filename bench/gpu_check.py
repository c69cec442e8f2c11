"""One turnkey GPU check: build, op correctness on every provider and dtype, benchmarks beside floors and bounds.

Also a 3-task end-to-end run — in one call, written to ``DIR/RESULTS-gpu.md`` and ``DIR/gpu-check.json``.

    python bench/gpu_check.py --out DIR              # on a CUDA machine (≤ 8 minutes on one H100/H200)
    python bench/gpu_check.py --out DIR --dry-run    # the same code paths on the CPU: Triton interpreter, tiny shapes

Stages, each timed, each failure recorded (with its traceback) without stopping the next, the report rewritten
atomically after every stage so that a run stopped at any point leaves every finished stage on disk:

1. ``environment``: device, driver, torch / triton / CUDA versions, git SHA (``git`` or ``HALRP_GIT_SHA``).
2. ``build``: the package installed in place (``pip install --no-deps --no-build-isolation --no-index -e .``: the
   machine's own torch and triton, the compiled extension built for its GPU), unless it already imports; a failed
   build is reported and the check goes on without the extension.
3. ``ops``: every op (linear, mixed linear, conv, mixed conv; output and every gradient) on every provider that
   serves the device, in fp32 / fp16 / bf16, on odd shapes and ranks 1..>64 against the float64 oracle (the plain
   formula on each task's explicit weight; fp32: within 1e-4 of the scale, TF32 off; fp16/bf16: error ≤ 2 × PyTorch's
   own error on the same math at that type + the type's eps at the tensor's scale).
4. ``tests``: the Triton test files under pytest (on a GPU they run on CUDA, bf16 included).
5. ``linear``, ``mixed``, ``conv``, ``rsvd``: medians (``triton.testing.do_bench`` on CUDA) of our op against the
   dense floor, the eager formula and ``torch.compile`` of it, each beside its roofline bound
   (``bench/roofline.py``) and the target it serves.
6. ``end_to_end``: 3 tasks of permuted digits with LeNet, seconds per phase; ``end_to_end_compiled``: the same with
   ``HALRPConfig(compile="reduce-overhead")`` (CUDA graphs; ``"default"`` on the CPU), when the budget leaves 2 minutes.

The exit status is 1 when an op check failed or a stage raised, else 0 (a missed performance target is a finding,
reported in the table, not a failure of the check).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
from gpu_benchmarks import stage_conv, stage_end_to_end, stage_linear, stage_mixed, stage_rsvd  # noqa: E402


# ------------------------------------------------------------------------------------------------
# the report: sections of records, rewritten atomically after each stage
# ------------------------------------------------------------------------------------------------
class Report:
    def __init__(self, out: Path, dry_run: bool) -> None:
        self.out = out
        self.data: dict = {"dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": {}}

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {"status": "running", "seconds": 0.0, "records": []})

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.out / "gpu-check.json", json.dumps(self.data, indent=1, default=str))
        _atomic_write(self.out / "RESULTS-gpu.md", render_markdown(self.data))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return "" if v is None else str(v)


def render_markdown(data: dict) -> str:
    env = data["stages"].get("environment", {}).get("records", [{}])
    env = env[0] if env else {}
    lines = [f"# GPU check{' (dry run on the CPU)' if data['dry_run'] else ''}", "",
             f"started {data['started']}; " + ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    for name, st in data["stages"].items():
        if name == "environment":
            continue
        lines += [f"## {name} — {st['status']} ({st['seconds']:.1f} s)", ""]
        if st.get("error"):
            lines += ["```", st["error"][-3000:], "```", ""]
        records = st["records"]
        if records:
            keys = list(dict.fromkeys(k for r in records for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in records]
            lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HALRP_GIT_SHA", "unknown")


def stage_environment(ctx, records) -> None:
    import torch

    row = {"device": ctx.device, "name": torch.cuda.get_device_name() if ctx.device == "cuda" else platform.machine(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "git": git_sha()}
    try:
        import triton

        row["triton"] = triton.__version__
    except ImportError:
        row["triton"] = None
    if ctx.device == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        row["driver, memory, max SM clock"] = smi.stdout.strip() or smi.stderr.strip()
    records.append(row)


_IMPORT_CHECK = "import halrp_fast.kernels, halrp_fast._C"


def install(out: Path) -> dict:
    """Install the package in place (editable, offline, no dependencies: the machine's torch and triton) unless it
    and its compiled extension already import; a failed build is retried without the extension (the check then runs
    on the Python and Triton paths).  Runs before anything imports halrp_fast; the outcome goes to ``build.json``."""
    if subprocess.run([sys.executable, "-c", _IMPORT_CHECK], cwd=out, capture_output=True).returncode == 0:
        return {"extension": "already installed", "seconds": 0.0}
    tic = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
           str(ROOT)]
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    row = {"extension": "built", "seconds": 0.0}
    if done.returncode != 0:
        row = {"extension": "build failed, installed without it", "error": done.stderr[-3000:]}
        subprocess.run(cmd, capture_output=True, text=True, env=dict(env, HALRP_FAST_NO_EXT="1"), check=True)
    row["seconds"] = time.perf_counter() - tic
    return row


def stage_build(ctx, records) -> None:
    row = json.loads((ctx.out / "build.json").read_text()) if (ctx.out / "build.json").exists() else \
        {"extension": "not built (--stages without build)"}
    records.append(row)
    if "error" in row:
        raise RuntimeError(f"the extension failed to build (the check went on without it):\n{row['error']}")


def _providers(device: str) -> list[str]:
    from halrp_fast import _backend

    out = []
    for name, p in _backend._PROVIDERS.items():
        if ("*" in p.devices or device in p.devices) and p.why_not() is None:
            out.append(name)
    return out


def _op_cases(dry: bool):
    """``(op, shape)`` of the op sweep: odd sizes, ranks 1 .. > 64, an empty batch, a large-tile M."""
    big = 40 if dry else 600
    lin = [(0, 13, 11, 3), (7, 37, 31, 1), (65, 37, 31, 33), (3, 40, 33, 70), (big, 45, 37, 8)]
    conv = [(2, 5, 7, 9, 3, 1, 3), (3, 6, 4, 8, 5, 2, 1), (2, 4, 6, 7, 3, 0, 70)]  # N, C_in, C_out, HW, k, pad, rank
    for shape in lin:
        yield "linear", shape
        yield "linear_mt", shape
    for shape in conv:
        yield "conv", shape
        yield "conv_mt", shape


def _merged_weight(conv: bool, W, r, s, U, V):
    """The explicit task weight ``diag(r) W diag(s) + U Vᵀ`` (conv: U Vᵀ at every kernel position)."""
    if conv:
        return r[:, None, None, None] * W * s[None, :, None, None] + (U @ V.T)[:, :, None, None]
    return r[:, None] * W * s + U @ V.T


def _plain(conv: bool, x, W, params, ids, padding: int):
    """The op through PyTorch's own layers on each task's explicit weight, one task group at a time, in ``x``'s
    dtype (float64: the oracle; fp16/bf16: PyTorch's own error at that type, the yardstick)."""
    import torch
    import torch.nn.functional as F

    def layer(xx, r, s, U, V, b):
        w = _merged_weight(conv, W.to(xx.dtype), r, s, U, V)
        return F.conv2d(xx, w, b, 1, padding) if conv else F.linear(xx, w, b)

    if ids is None:
        return layer(x, *params)
    if not len(ids):
        return layer(x, *(p[0] for p in params))
    order, pieces = [], []
    for t in torch.unique(ids).tolist():
        idx = (ids == t).nonzero().flatten()
        order.append(idx)
        pieces.append(layer(x[idx], *(p[t] for p in params)))
    return torch.cat(pieces)[torch.argsort(torch.cat(order))]


def _ours(op: str, x, W, params, ids, padding: int):
    import halrp_fast as hf

    if op == "linear":
        return hf.perturbed_linear(x, W, *params)
    if op == "linear_mt":
        return hf.perturbed_linear_mt(x, ids, W, *params)
    if op == "conv":
        return hf.perturbed_conv2d(x, W, *params, 1, padding)
    return hf.perturbed_conv2d_mt(x, ids, W, *params, 1, padding)


def _check_case(op: str, shape: tuple, dtype, device: str) -> dict:
    """The output and the gradients of x, r, s, U, V, b of one call against the float64 oracle: fp32 within 1e-4
    of each tensor's scale; fp16/bf16 each within 2 × PyTorch's own error on the same math at that type plus one
    unit of the type's precision at the tensor's scale (eps: 2⁻¹⁰ fp16, 2⁻⁷ bf16).  Returns the worst ratio of
    error to allowance (≤ 1 passes)."""
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(repr((op, shape)).encode()))

    def rnd(*size, scale=1.0, shift=0.0):
        return shift + scale * torch.randn(*size, generator=g, dtype=torch.float64)

    conv, mixed, tasks = op.startswith("conv"), op.endswith("_mt"), 3
    if conv:
        batch, n_in, n_out, hw, kern, padding, k = shape
        x, W = rnd(batch, n_in, hw, hw), rnd(n_out, n_in, kern, kern, scale=(n_in * kern * kern) ** -0.5)
    else:
        batch, n_in, n_out, k = shape
        x, W, padding = rnd(batch, n_in), rnd(n_out, n_in, scale=n_in**-0.5), 0
    lead = (tasks,) if mixed else ()
    params = [rnd(*lead, n_out, scale=0.3, shift=1.0), rnd(*lead, n_in, scale=0.3, shift=1.0),
              rnd(*lead, n_out, k, scale=0.3), rnd(*lead, n_in, k, scale=0.3), rnd(*lead, n_out)]
    ids = torch.randint(0, tasks, (batch,), generator=g) if mixed else None

    def run(fn, dt, dev):
        leaves = [t.to(dt).to(dev).requires_grad_() for t in (x, *params)]
        y = fn(leaves[0], W.to(dt).to(dev), leaves[1:], None if ids is None else ids.to(dev))
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad(y, leaves, gy.to(dt).to(dev), allow_unused=True) if y.numel() else ()
        return [t.detach().double().cpu() for t in (y, *grads) if t is not None]

    oracle = run(lambda *a: _plain(conv, *a, padding), torch.float64, "cpu")
    ours = run(lambda *a: _ours(op, *a, padding), dtype, device)
    plain = run(lambda *a: _plain(conv, *a, padding), dtype, device) if dtype != torch.float32 else None
    worst, eps = 0.0, torch.finfo(dtype).eps
    for i, (got, want) in enumerate(zip(ours, oracle, strict=True)):
        if not want.numel():
            continue
        scale = max(1.0, want.abs().max().item())
        err = (got - want).abs().max().item()
        allowed = 1e-4 * scale if plain is None else 2 * (plain[i] - want).abs().max().item() + eps * scale
        worst = max(worst, err / allowed)
    return {"worst err / allowed": worst, "ok": worst <= 1.0}


def stage_ops(ctx, records) -> None:
    import torch

    from halrp_fast import _backend

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    failures = 0
    for provider in _providers(ctx.device):
        os.environ[_backend.ENV_VAR] = provider
        _backend._SELECTION.clear()
        for dtype in dtypes:
            if ctx.dry_run and provider == "triton" and dtype == torch.bfloat16:
                continue  # the interpreter computes bf16 on raw bits (checked on the GPU)
            for op, shape in _op_cases(ctx.dry_run):
                name = {"linear": "perturbed_linear", "linear_mt": "perturbed_linear_mt",
                        "conv": "perturbed_conv2d", "conv_mt": "perturbed_conv2d_mt"}[op]
                served = _backend.select(name, ctx.device, dtype)[0]
                if served != provider:
                    continue
                row = {"provider": provider, "dtype": _backend.dtype_name(dtype), "op": op, "shape": shape}
                try:
                    row.update(_check_case(op, shape, dtype, ctx.device))
                except Exception as err:  # noqa: BLE001 — every failure is a finding of the check
                    row.update({"ok": False, "error": f"{type(err).__name__}: {err}"[:300]})
                failures += not row["ok"]
                records.append(row)
    os.environ.pop(_backend.ENV_VAR, None)
    _backend._SELECTION.clear()
    if failures:
        raise AssertionError(f"{failures} op checks failed (rows with ok = no)")


#: the test files whose tests run on CUDA when a GPU is visible (on the CPU they take the Triton interpreter)
GPU_TEST_FILES = ("tests/test_triton_linear.py", "tests/test_triton_conv.py")


def stage_tests(ctx, records) -> None:
    """The Triton test files under pytest (on the GPU: the same tests the CPU runs in the interpreter, bf16
    included); the dry run takes one quick test of them."""
    selection = ["-k", "rank_zero_gradients"] if ctx.dry_run else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES, *selection]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    records.append({"files": len(GPU_TEST_FILES), "summary": summary, "exit status": done.returncode})
    if done.returncode != 0:
        raise AssertionError(f"pytest exited with {done.returncode}:\n{done.stdout[-3000:]}")


STAGES = [("environment", stage_environment, 0), ("build", stage_build, 60), ("ops", stage_ops, 60),
          ("tests", stage_tests, 60),
          ("linear", stage_linear, 60), ("mixed", stage_mixed, 30), ("conv", stage_conv, 30),
          ("rsvd", stage_rsvd, 30), ("end_to_end", stage_end_to_end, 45),
          # compiled graphs shared by the tasks; on CUDA with CUDA graphs ("reduce-overhead"), on the CPU "default"
          ("end_to_end_compiled", lambda ctx, records: stage_end_to_end(
              ctx, records, "default" if ctx.device == "cpu" else "reduce-overhead"), 120)]


class Context:
    def __init__(self, device: str, dry_run: bool, out: Path) -> None:
        import torch

        self.device, self.dry_run, self.out = device, dry_run, out
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        self.dtype = torch.float32 if dry_run else torch.bfloat16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for RESULTS-gpu.md and gpu-check.json")
    ap.add_argument("--dry-run", action="store_true", help="the CPU and the Triton interpreter, tiny shapes")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="wall-clock budget: a stage is skipped when less than its minimum is left")
    ap.add_argument("--stages", nargs="+", default=[s[0] for s in STAGES], choices=[s[0] for s in STAGES])
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="where the full check runs (default: cuda; cpu with --dry-run)")
    args = ap.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it at import: start again
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                              env=env).returncode
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = float(os.environ.get("HALRP_GPU_CHECK_START", time.time()))
    if not args.dry_run and "build" in args.stages and "HALRP_GPU_CHECK_START" not in os.environ:
        row = install(out)  # before halrp_fast is imported
        _atomic_write(out / "build.json", json.dumps(row))
        if row["extension"] != "already installed":  # an editable install is seen by a new interpreter only
            os.environ["HALRP_GPU_CHECK_START"] = repr(start)
            os.execv(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])])
    sys.path.insert(0, str(BENCH))
    import torch

    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device is visible (use --dry-run on a machine without one)")
    report = Report(out, args.dry_run)
    ctx = Context(device, args.dry_run, out)
    failed = False
    for name, fn, minimum in STAGES:
        if name not in args.stages or (name == "build" and args.dry_run):
            continue
        st = report.stage(name)
        left = args.budget_s - (time.time() - start)
        if left < minimum:
            st["status"] = f"skipped ({left:.0f} s left of the budget, {minimum} s needed)"
            report.write()
            continue
        tic = time.perf_counter()
        triton_path = args.dry_run and name in ("linear", "mixed", "conv")
        if triton_path:  # the provider a GPU takes, in the interpreter
            os.environ["HALRP_FAST_BACKEND"] = "triton"
        try:
            fn(ctx, st["records"])
            st["status"] = "done"
        except Exception:  # noqa: BLE001 — recorded; the next stage runs
            st["status"], st["error"] = "failed", traceback.format_exc()
            failed = True
        finally:
            if triton_path:
                os.environ.pop("HALRP_FAST_BACKEND", None)
        st["seconds"] = time.perf_counter() - tic
        print(f"gpu_check: {name} {st['status']} in {st['seconds']:.1f} s", flush=True)
        report.write()
    report.data["total seconds"] = time.time() - start
    report.write()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
