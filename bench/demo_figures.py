"""Re-derive the README's demo figures: ``halrp-fast demo`` (seed 0), the same over seeds 0–2, and the variant without
the all-task bound (10 % prune, batch 32, per-epoch decay) over seeds 0–2.  Prints one line per command with ACC, BWT,
forgetting, growth (mean ± std over seeds) and the wall time, to be compared with (or copied into) the README.

    python bench/demo_figures.py            # about 4 minutes on a 2-core CPU
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

from halrp_fast.cli import main

COMMANDS = {
    "halrp-fast demo": [],
    "halrp-fast demo --repeats 3": ["--repeats", "3"],
    "halrp-fast demo --repeats 3 (no all-task bound)": ["--repeats", "3", "--batch-size", "32", "--schedule", "epoch",
                                                        "--lr-decay", "0.95", "--prune-value", "1e-5", "0.1",
                                                        "--no-prune-bound"],
}


def _run(args: list[str], out: Path) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["demo", "--out", str(out), "--no-progress", "--quiet", *args])
    if rc != 0:
        raise SystemExit(f"halrp-fast demo {' '.join(args)} exited {rc}")
    runs = sorted(out.rglob("results.json"))
    results = [json.loads(p.read_text()) for p in runs]
    return {"runs": len(results), **{k: [r[k] for r in results] for k in ("ACC", "BWT", "forgetting")},
            "growth": [100 * r["growth"] for r in results], "wall": [r["meta"]["wall_seconds"] for r in results]}


def _summary(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5  # as `halrp-fast report` (over the runs)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def run_all() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, args) in enumerate(COMMANDS.items()):
            got = _run(args, Path(tmp) / str(i))
            print(f"{name}: ACC {_summary(got['ACC'], 2)} %, BWT {_summary(got['BWT'], 2)}, forgetting "
                  f"{_summary(got['forgetting'], 2)}, growth {_summary(got['growth'], 1)} %, wall "
                  f"{_summary(got['wall'], 0)} s per run ({got['runs']} run(s))", flush=True)


if __name__ == "__main__":
    sys.exit(run_all())
