"""``bench/gpu_check.py --dry-run``: the GPU check's code paths on the CPU (Triton interpreter, tiny shapes), so
that its first run on a GPU measures instead of debugging.  Also: a stage that raises is recorded and the next one
still runs, and a missing device is a one-line error."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    return done, out


def test_dry_run_passes_every_stage(dry_run):
    done, out = dry_run
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    data = json.loads((out / "gpu-check.json").read_text())
    assert data["dry_run"] is True
    stages = data["stages"]
    assert set(stages) == {"environment", "ops", "tests", "linear", "mixed", "conv", "rsvd", "end_to_end",
                           "end_to_end_compiled"}
    for name, st in stages.items():
        assert st["status"] == "done", (name, st.get("error"))
        assert st["records"], name
    md = (out / "RESULTS-gpu.md").read_text()
    for name in stages:
        if name != "environment":
            assert f"## {name} — done" in md


def test_dry_run_checks_every_provider_and_dtype_against_the_oracle(dry_run):
    _, out = dry_run
    ops = json.loads((out / "gpu-check.json").read_text())["stages"]["ops"]["records"]
    assert all(r["ok"] for r in ops), [r for r in ops if not r["ok"]]
    seen = {(r["provider"], r["dtype"]) for r in ops}
    for provider in ("reference", "triton"):
        assert (provider, "float32") in seen and (provider, "float16") in seen
    assert ("reference", "bfloat16") in seen
    assert {r["op"] for r in ops} == {"linear", "linear_mt", "conv", "conv_mt"}
    ranks = {r["shape"][-1] for r in ops}
    assert 1 in ranks and max(ranks) > 64


def test_dry_run_benchmarks_take_the_triton_path_beside_their_bounds(dry_run):
    _, out = dry_run
    stages = json.loads((out / "gpu-check.json").read_text())["stages"]
    for name in ("linear", "mixed", "conv"):
        rows = stages[name]["records"]
        assert {r["provider"] for r in rows} == {"triton"}, name
        assert all(r["bound ms"] > 0 and r["ours ms"] > 0 for r in rows), name
    assert all("target" in r and "met" in r for r in stages["linear"]["records"])
    for name, mode in (("end_to_end", "off"), ("end_to_end_compiled", "default")):
        phases = stages[name]["records"]
        assert [r["task"] for r in phases] == [0, 1, 2] and {r["compile"] for r in phases} == {mode}
        assert all(0 <= r["test acc %"] <= 100 for r in phases)


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    def broken(ctx, records):
        records.append({"partial": 1})
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_check, "STAGES", [("environment", gpu_check.stage_environment, 0),
                                              ("ops", broken, 0), ("rsvd", gpu_check.stage_rsvd, 0)])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--stages", "environment", "ops", "rsvd"])
    assert rc == 1
    stages = json.loads((tmp_path / "gpu-check.json").read_text())["stages"]
    assert stages["ops"]["status"] == "failed" and "planted failure" in stages["ops"]["error"]
    assert stages["ops"]["records"] == [{"partial": 1}]
    assert stages["rsvd"]["status"] == "done"
    assert "planted failure" in (tmp_path / "RESULTS-gpu.md").read_text()


def test_no_cuda_device_is_a_one_line_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--stages", "environment"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2
    assert "no CUDA device is visible" in done.stderr.strip().splitlines()[-1]


def test_a_failing_compiled_baseline_costs_only_its_column(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    import torch

    def broken(fn, **options):
        def run(*args, **kwargs):
            raise RuntimeError("planted compile failure")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--stages", "environment", "linear"]) == 0
    rows = json.loads((tmp_path / "gpu-check.json").read_text())["stages"]["linear"]["records"]
    fwd = [r for r in rows if r["kind"] == "fwd"]
    assert fwd and all("planted compile failure" in r["compile error"] for r in fwd)
    assert all(r["ours ms"] > 0 and r["dense ms"] > 0 for r in rows)
