"""Merge the results of several runs (``results.json`` files) into one table, with mean ± std over repeats and
order robustness (OPD / AOPD / MOPD) over task orders."""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import metrics

COLUMNS = ["run", "benchmark", "model", "order", "seed", "tasks", "ACC", "BWT", "forgetting", "growth %", "MB stored",
           "wall s", "processes"]


def find_results(paths: list[str | Path]) -> list[Path]:
    """Every ``results.json`` at or below ``paths``."""
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.json")))
        else:
            raise FileNotFoundError(f"{p}: no results.json there (give run directories or results.json files)")
    if not found:
        raise FileNotFoundError(f"no results.json under {[str(p) for p in paths]}")
    return found


def _row(path: Path, r: dict) -> dict:
    meta = r.get("meta", {})
    return {"run": str(path.parent), "benchmark": meta.get("benchmark", "?"), "model": meta.get("model", "?"),
            "order": meta.get("order") or "-", "seed": r.get("config", {}).get("seed", "?"),
            "tasks": len(r["acc_matrix"]), "ACC": r["ACC"], "BWT": r["BWT"], "forgetting": r["forgetting"],
            "growth %": 100 * r["growth"], "MB stored": r["bytes"]["total"] / 2**20,
            "wall s": meta.get("wall_seconds", float("nan")), "processes": len(meta.get("sessions", [])) or "?",
            "_final": r["final_accuracy"],
            "_names": meta.get("task_names") or r.get("tasks", [])}


def order_robustness(rows: list[dict]) -> dict | None:
    """OPD/AOPD/MOPD over the runs of different orders (same benchmark, first seed of each order)."""
    by_order = {}
    for row in rows:
        if row["order"] != "-" and row["order"] not in by_order:
            by_order[row["order"]] = row
    if len(by_order) < 2:
        return None
    # Runs cut short (--tasks) hold different tasks per order: compare the tasks that every order trained.
    common = sorted(set.intersection(*(set(row["_names"]) for row in by_order.values())))
    if not common:
        return None
    ident = {n: i for i, n in enumerate(common)}
    finals, orders = {}, {}
    for o, row in by_order.items():
        kept = [(ident[n], a) for n, a in zip(row["_names"], row["_final"], strict=True) if n in ident]
        orders[o], finals[o] = [k for k, _ in kept], [a for _, a in kept]
    result = metrics.order_robustness(finals, orders)
    names = common
    result["OPD"] = {names[i]: v for i, v in result["OPD"].items()}
    result["orders"] = sorted(by_order)
    return result


def read_rows(paths: list[Path]) -> tuple[list[dict], list[tuple[str, str]]]:
    """The table rows of the readable ``results.json`` files, and ``(file, why)`` for every one left out."""
    rows, skipped = [], []
    for p in paths:
        try:
            rows.append(_row(p, json.loads(p.read_text())))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skipped.append((str(p), f"unreadable: {exc}"))
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            skipped.append((str(p), f"not a halrp-fast results file ({type(exc).__name__}: {exc})"))
    return rows, skipped


def build_report(paths: list[str | Path]) -> tuple[str, str, dict]:
    """``(markdown, csv, summary)`` for the runs under ``paths``; files that cannot be read are left out and listed
    in ``summary["skipped"]`` (an error when none can be read)."""
    rows, skipped = read_rows(find_results(paths))
    if not rows:
        raise ValueError("no readable results.json: " + "; ".join(f"{f}: {why}" for f, why in skipped))
    fmt = {"ACC": "{:.2f}", "BWT": "{:.2f}", "forgetting": "{:.2f}", "growth %": "{:.1f}", "MB stored": "{:.2f}",
           "wall s": "{:.1f}"}

    def cell(row, c):
        v = row[c]
        return fmt[c].format(v) if c in fmt and isinstance(v, (int, float)) else str(v)

    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["benchmark"], r["model"], r["order"])].append(r)
    summary: dict = {"runs": len(rows), "groups": {}, "skipped": [{"file": f, "why": w} for f, w in skipped]}
    md += ["", "| benchmark | model | order | runs | ACC | BWT | forgetting | growth % |", "|" + "---|" * 8]
    for (bench, model, order), rs in groups.items():
        stats = {c: (float(np.mean([r[c] for r in rs])), float(np.std([r[c] for r in rs])))
                 for c in ("ACC", "BWT", "forgetting", "growth %")}
        summary["groups"][f"{bench}/{model}/{order}"] = {"runs": len(rs), **{c: list(v) for c, v in stats.items()}}
        md.append(f"| {bench} | {model} | {order} | {len(rs)} | " +
                  " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in stats.values()) + " |")
    for bench in sorted({r["benchmark"] for r in rows}):
        rob = order_robustness([r for r in rows if r["benchmark"] == bench])
        if rob:
            summary.setdefault("order_robustness", {})[bench] = rob
            md += ["", f"Order robustness of {bench} over orders {''.join(rob['orders'])} "
                       f"({len(rob['OPD'])} tasks common to all): AOPD {rob['AOPD']:.2f}, MOPD {rob['MOPD']:.2f}"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([r[c] for c in COLUMNS])
    return "\n".join(md), out.getvalue(), summary
