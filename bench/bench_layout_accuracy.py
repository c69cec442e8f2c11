"""Task accuracy in channels-last against NCHW, learned from the same base with the same task seeds.

One base (task 0) is trained in ``--base-layout``; then task 1 is learned from that same base once per task
seed and per layout (the learner's ``seed`` fixes the task's data order and initialisation). The table
pairs the two layouts for each seed; the summary gives the mean and spread of the paired difference next
to the spread between seeds, which is what a single run per layout cannot separate.

    python bench/bench_layout_accuracy.py                                  # ResNet-18, NCHW base, 4 seeds
    python bench/bench_layout_accuracy.py --base-layout channels-last --seeds 1000 1001 1002 1003

The stream is permuted Fashion-MNIST at 32×32×3 (Debian's ``dataset-fashion-mnist``, or ``--data-dir``) with
the settings of ``bench/bench_end_to_end.py``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics

import torch
from _common import environment_line, markdown_table, parse_args

from halrp_fast import models
from halrp_fast.continual import HALRPConfig, HALRPLearner
from halrp_fast.data import benchmarks

LAYOUTS = {"nchw": False, "channels-last": True}


def learner_in(layout: str, base: HALRPLearner) -> HALRPLearner:
    """A learner holding a copy of ``base``'s model, its weights and activations in ``layout``."""
    model = copy.deepcopy(base.model).to(memory_format=torch.contiguous_format)
    learner = HALRPLearner(model, dataclasses.replace(base.config, channels_last=LAYOUTS[layout]))
    learner.reports = copy.deepcopy(base.reports)  # the next learn_task is task 1
    return learner


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=["lenet", "alexnet", "resnet18"])
    ap.add_argument("--base-layout", default="nchw", choices=list(LAYOUTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002, 1003],
                    help="task seeds of task 1 (one pair of runs each)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stream and of the base")
    ap.add_argument("--max-per-task", type=int, default=2000, help="training samples per task")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per task (1 of them for the free model)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    args = parse_args(ap, argv)
    if args.epochs < 2:
        ap.error("--epochs must be ≥ 2 (one for the free model, at least one for the perturbation)")
    bench = benchmarks.get("pfmnist")
    tasks = bench.build(args.batch_size, args.seed, max_per_task=args.max_per_task, data_dir=args.data_dir)[:2]
    cfg = HALRPConfig(**{**bench.config, "epochs": args.epochs, "est_rank_epochs": 1, "seed": args.seed,
                         "channels_last": LAYOUTS[args.base_layout]})
    print(environment_line("cpu"))
    torch.manual_seed(args.seed)
    base = HALRPLearner(getattr(models, args.model)(3, 32, 10), cfg)
    base.learn_task(tasks[0].train, tasks[0].val, tasks[0].num_classes)
    print(f"{args.model}: base trained {args.base_layout}, task 0 test accuracy "
          f"{base.evaluate(tasks[0].test, 0):.2f} %", flush=True)

    rows, diffs, accs = [], [], []
    for seed in args.seeds:
        acc = {}
        for layout in LAYOUTS:
            learner = learner_in(layout, base)
            learner.config = dataclasses.replace(learner.config, seed=seed)
            report = learner.learn_task(tasks[1].train, tasks[1].val, tasks[1].num_classes)
            acc[layout] = learner.evaluate(tasks[1].test, 1)
            print(f"  seed {seed} {layout}: rank sum {sum(report.ranks.values())}, "
                  f"accuracy {acc[layout]:.2f} %", flush=True)
        rows.append([args.base_layout, seed, acc["nchw"], acc["channels-last"], acc["channels-last"] - acc["nchw"]])
        diffs.append(acc["channels-last"] - acc["nchw"])
        accs += acc.values()
    print(markdown_table(["base", "task seed", "NCHW acc %", "channels-last acc %", "CL − NCHW"], rows))
    spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    print(f"channels-last − NCHW: mean {statistics.mean(diffs):+.2f} points, standard deviation {spread:.2f} "
          f"({len(diffs)} pairs); accuracy over all runs {min(accs):.2f}–{max(accs):.2f} %")


if __name__ == "__main__":
    main()
