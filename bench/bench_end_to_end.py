"""Wall time per task of the whole method: halrp_fast against a straightforward eager implementation.

For each network (LeNet, AlexNet, ResNet-18 of the paper) on one fixed task stream, the base (task 0) is
trained once by halrp_fast; then tasks 1..T are learned twice from that same base:

* ``fast``: :class:`halrp_fast.continual.HALRPLearner` (fused ops, vectorised scalings, randomized SVD grown
  until the allocation is exact, on-device quantiles, merged-weight evaluation; ``--compile default``: its
  training and evaluation passes through torch.compile graphs shared by all tasks, compile time included);
* ``eager``: ``bench/_naive_halrp.py`` (three separate convs/matmuls per layer, Python loops for the
  scalings, a full SVD per layer, numpy percentiles, evaluation through the three ops).

Each phase (free training, importance, scalings + SVD + allocation, training, pruning, evaluation on the
task's test split) is timed per task; the table gives the mean seconds per task of each phase, the ratio
eager / fast, and both implementations' mean test accuracy over the learned tasks (equal accuracy is
part of the comparison: a gap of more than 2 points is flagged).

The floor (``--floor on``, the default): the same phases' dense work done by the plain network alone — its
training steps over the task's training split for the free model's and the perturbation's epochs, its
importance pass over the validation split, its evaluation of the test split — through the same loops
(``halrp_fast.continual.training``), in halrp_fast's layout, eager and compiled with inductor (compile time
left out: the floor is the compiled code's own time).  Every phase of the method does at least that work, so
``eager / plain compiled`` over the whole task is the most any implementation could gain over the eager
baseline with this network's steps at inductor's speed.  Scalings, SVD and pruning have no dense counterpart
(floor 0 s, which only raises that bound).

    python bench/bench_end_to_end.py                          # permuted Fashion-MNIST, 3 networks
    python bench/bench_end_to_end.py --models lenet --tasks 4 --max-per-task 4000 --epochs 5

The stream is permuted Fashion-MNIST at 32×32×3 (Debian's ``dataset-fashion-mnist``, or ``--data-dir``); the
hyper-parameters are the paper's PMNIST ones except ``--epochs`` (fewer, so the run stays short on a CPU).
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import environment_line, markdown_table, parse_args
from _naive_halrp import NaiveHALRP

from halrp_fast import models
from halrp_fast.continual import HALRPConfig, HALRPLearner
from halrp_fast.continual.config import CHANNELS_LAST_CHOICES, COMPILE_MODES
from halrp_fast.continual.importance import empirical_fisher
from halrp_fast.continual.training import accuracy, train
from halrp_fast.data import benchmarks

PHASES = ("free_training", "importance", "svd_allocation", "training", "pruning", "evaluation")


def plain_phases(network: torch.nn.Module, task, cfg: HALRPConfig, compiled: bool) -> dict[str, float]:
    """Seconds of each phase's dense work done by ``network`` (a plain model, trained in place) on ``task``:
    ``free_training`` / ``training`` its steps for ``est_rank_epochs`` / ``epochs − est_rank_epochs`` epochs of
    the training split, ``importance`` the empirical Fisher pass over the validation split, ``evaluation`` the
    test split.  ``compiled``: the forward through inductor, every phase run once untimed first so that no
    compilation (a new batch size included) is timed."""
    forward = torch.compile(network) if compiled else network
    weights = {n: p for n, p in network.named_parameters() if p.dim() > 1}

    def steps(epochs: int):
        return lambda: train(forward, list(network.parameters()), task.train, epochs, cfg, modules=[network])

    work = {
        "free_training": steps(cfg.est_rank_epochs),
        "importance": lambda: empirical_fisher(network, weights, task.val, cfg.device, forward=forward),
        "training": steps(cfg.epochs - cfg.est_rank_epochs),
        "evaluation": lambda: _evaluate(network, forward, task.test, cfg),
    }
    seconds = {}
    for phase, run in work.items():
        if compiled:
            run()
        tic = time.perf_counter()
        run()
        seconds[phase] = time.perf_counter() - tic
    return seconds


def _evaluate(network: torch.nn.Module, forward, loader, cfg: HALRPConfig) -> float:
    network.eval()
    try:
        with torch.no_grad():
            return accuracy(forward, loader, cfg.device, dtype=cfg.torch_dtype)
    finally:
        network.train()


def run_network(name: str, tasks, args) -> list[list]:
    bench = benchmarks.get("pfmnist")
    cfg = HALRPConfig(**{**bench.config, "epochs": args.epochs, "est_rank_epochs": 1, "seed": args.seed,
                         "channels_last": CHANNELS_LAST_CHOICES[args.channels_last], "compile": args.compile})
    torch.manual_seed(args.seed)
    learner = HALRPLearner(getattr(models, name)(3, 32, 10), cfg)
    tic = time.perf_counter()
    learner.learn_task(tasks[0].train, tasks[0].val, tasks[0].num_classes)
    print(f"{name}: base trained in {time.perf_counter() - tic:.1f} s", flush=True)
    # the straightforward implementation keeps PyTorch's default (NCHW) layout
    naive = NaiveHALRP(learner.model.export_task(0).to(memory_format=torch.contiguous_format),
                       learner.model.head_name, cfg)

    floor_s = {}
    if args.floor == "on":
        for compiled in (False, True):
            plain = learner.model.export_task(0).train().requires_grad_(True)  # in halrp_fast's layout
            floor_s[compiled] = plain_phases(plain, tasks[1], cfg, compiled)
            torch._dynamo.reset()
        print(f"  plain network per task: eager {sum(floor_s[False].values()):.2f} s, compiled "
              f"{sum(floor_s[True].values()):.2f} s (compile time left out)", flush=True)

    fast_s = {p: [] for p in PHASES}
    eager_s = {p: [] for p in PHASES}
    for t in range(1, len(tasks)):
        d = tasks[t]
        report = learner.learn_task(d.train, d.val, d.num_classes)
        tic = time.perf_counter()
        learner.evaluate(d.test, t)
        report.seconds["evaluation"] = time.perf_counter() - tic
        seconds = naive.learn_task(d.train, d.val, d.num_classes)
        tic = time.perf_counter()
        naive.evaluate(d.test, t)
        seconds["evaluation"] = time.perf_counter() - tic
        for p in PHASES:
            fast_s[p].append(report.seconds.get(p, 0.0))
            eager_s[p].append(seconds[p])
        print(f"  task {t}: fast {sum(report.seconds.get(p, 0.0) for p in PHASES):.2f} s "
              f"(ranks {report.ranks}), eager {sum(seconds.values()):.2f} s (ranks {naive.ranks(t)})", flush=True)

    learned = range(1, len(tasks))
    acc_fast = sum(learner.evaluate(tasks[t].test, t) for t in learned) / len(learned)
    acc_eager = sum(naive.evaluate(tasks[t].test, t) for t in learned) / len(learned)
    rows = []
    for p in (*PHASES, "total"):
        f = sum(map(sum, fast_s.values())) if p == "total" else sum(fast_s[p])
        e = sum(map(sum, eager_s.values())) if p == "total" else sum(eager_s[p])
        f, e = f / len(learned), e / len(learned)
        row = [name, p, f, e, e / f if f > 0 else float("nan")]
        if floor_s:
            plain, floor = (sum(s.values()) if p == "total" else s.get(p, 0.0) for s in (floor_s[False], floor_s[True]))
            row += [plain, floor, f / floor if floor > 0 else float("nan"), e / floor if floor > 0 else float("nan")]
        rows.append(row + [acc_fast if p == "total" else "", acc_eager if p == "total" else ""])
    if abs(acc_fast - acc_eager) > 2:
        print(f"  warning: {name}: mean accuracies differ by {abs(acc_fast - acc_eager):.1f} points", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet", "alexnet", "resnet18"],
                    choices=["lenet", "alexnet", "resnet18"])
    ap.add_argument("--tasks", type=int, default=3, help="tasks of the stream, the base included (≥ 2)")
    ap.add_argument("--max-per-task", type=int, default=2000, help="training samples per task")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per task (1 of them for the free model)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", default="off", choices=list(COMPILE_MODES),
                    help="HALRPConfig.compile of the fast run (compile time counted in the phases it falls in)")
    ap.add_argument("--floor", default="on", choices=["on", "off"],
                    help="also time the plain network's share of every phase, eager and compiled (the floor)")
    ap.add_argument("--channels-last", default="auto", choices=list(CHANNELS_LAST_CHOICES),
                    help="layout of halrp_fast's run (auto: channels-last on CPU); the eager baseline stays NCHW")
    args = parse_args(ap, argv)
    if args.tasks < 2:
        ap.error("--tasks must be ≥ 2 (the base and at least one timed task)")
    if args.epochs < 2:
        ap.error("--epochs must be ≥ 2 (one for the free model, at least one for the perturbation)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = benchmarks.get("pfmnist").build(args.batch_size, args.seed, max_per_task=args.max_per_task,
                                            data_dir=args.data_dir)[: args.tasks]
    print(environment_line("cpu"))
    print(f"compile: {args.compile}; stream: permuted Fashion-MNIST, {args.tasks} tasks, {args.max_per_task} "
          f"training samples per task, "
          f"{args.epochs} epochs, batch {args.batch_size}, halrp_fast layout: channels-last {args.channels_last}; "
          f"seconds per task (mean over tasks 1..{args.tasks - 1})")
    rows = []
    for name in args.models:
        rows += run_network(name, tasks, args)
    floor = ["plain eager s", "plain compiled s", "fast / plain compiled", "eager / plain compiled"]
    print(markdown_table(["network", "phase", "fast s", "eager s", "eager / fast",
                          *(floor if args.floor == "on" else []), "fast acc %", "eager acc %"], rows))


if __name__ == "__main__":
    main()
