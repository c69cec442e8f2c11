"""``halrp-fast`` command line: ``env``, ``run``, ``demo``, ``report``."""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from ._cli_checks import Parser, check_device, in_cli_words, integer, interrupted_message, number, prepare_out_dir
from .cpu_allocator import add_option as add_allocator_option
from .cpu_allocator import apply_choice as apply_allocator_choice
from .cpu_allocator import cpu_allocator_state


def _cmd_env(args: argparse.Namespace) -> int:
    from . import env_report

    print(env_report())
    return 0


#: every HALRPConfig field and the flag that sets it (the plain ones, read as they are, are PLAIN_FLAGS)
CONFIG_FLAGS = {
    "epochs": "--epochs", "lr": "--lr", "lr_decay": "--lr-decay", "optimizer": "--optimizer", "adam_eps": "--adam-eps",
    "momentum": "--momentum", "paper_schedule": "--schedule", "train_frac": "--subset", "scalings": "--scalings",
    "approx_rate": "--approx-rate", "upper_rank": "--upper-rank", "rank_mode": "--rank-mode", "svd": "--svd",
    "est_rank_epochs": "--est-rank-epochs", "l1": "--l1", "wd": "--wd", "prune": "--prune",
    "prune_value": "--prune-value", "prune_bound_all_tasks": "--prune-bound / --no-prune-bound", "seed": "--seed",
    "device": "--device", "channels_last": "--channels-last", "dtype": "--dtype", "progress": "--no-progress",
    "compile": "--compile",
}
PLAIN_FLAGS = ("epochs", "lr", "lr_decay", "optimizer", "adam_eps", "momentum", "scalings", "approx_rate", "upper_rank",
               "rank_mode", "svd", "est_rank_epochs", "l1", "wd", "prune", "seed", "device", "dtype", "compile")
#: HALRPConfig fields the command line does not set, and why
API_ONLY = {
    "schedule_data_size": "the benchmark's dataset size, which the paper's learning-rate schedule is written for",
    "n_tasks": "the benchmark stream's number of tasks (the paper's schedule divides the data by it)",
    "valid_frac": "the benchmark's validation split (the authors' data protocol)",
}


def _config_from_args(bench, args: argparse.Namespace):
    from .continual import HALRPConfig
    from .continual.config import CHANNELS_LAST_CHOICES

    values = bench.config_for(getattr(args, "model", None))
    if getattr(args, "subset", None) is not None:
        values["train_frac"] = args.subset  # the paper's schedule counts the training subset
    for field in PLAIN_FLAGS:
        v = getattr(args, field, None)
        if v is not None:
            values[field] = v
    if getattr(args, "schedule", None) is not None:
        values["paper_schedule"] = args.schedule == "paper"
        if values["paper_schedule"] and args.lr_decay is None:
            values["lr_decay"] = 1.0  # a preset's per-epoch decay does not apply under the paper's schedule
    if args.prune == "none":
        values["prune"] = None
    if args.prune_value is not None:
        values["prune_value"] = tuple(args.prune_value) if len(args.prune_value) > 1 else args.prune_value[0]
    if args.no_prune_bound:
        values["prune_bound_all_tasks"] = False
    if args.prune_bound:
        values["prune_bound_all_tasks"] = True
    values["channels_last"] = CHANNELS_LAST_CHOICES[getattr(args, "channels_last", "auto")]
    values["progress"] = not args.no_progress
    return HALRPConfig(**values)


def format_table(results: dict) -> str:
    lines = ["| task | final acc % | rank total | params added | bytes |", "|---|---|---|---|---|"]
    offset = 1 if results.get("base") == "given" else 0  # the model's task of the stream's task 0
    for t, acc in enumerate(results["final_accuracy"]):
        key = "base" if t + offset == 0 else f"task_{t + offset}"
        ranks = sum(results["ranks"].get(str(t), {}).values())
        lines.append(f"| {t} | {acc:.2f} | {ranks} | {results['params'][key]} | {results['bytes'][key]} |")
    lines.append(f"\nACC {results['ACC']:.2f}%  BWT {results['BWT']:.2f}  forgetting {results['forgetting']:.2f}  "
                 f"growth {100 * results['growth']:.1f}%  wall {results['meta'].get('wall_seconds', 0):.1f}s"
                 + (f" over {results['meta']['resumes'] + 1} processes" if results["meta"].get("resumes") else ""))
    return "\n".join(lines)


#: the output directory of the run in progress (for the message after Ctrl-C)
_CURRENT_OUT: list[str | None] = [None]


def _check_orders(args: argparse.Namespace) -> None:
    from .data import benchmarks

    bench = benchmarks.get(args.benchmark)
    asked = (args.order or "") + (args.orders or "")
    if asked and not bench.orders:
        raise ValueError(f"--order/--orders: the {bench.name} stream has no task orders (the CIFAR-100 benchmarks "
                         f"have A–E)")
    if args.orders and (set(args.orders) - set(bench.orders) or not args.orders):
        raise ValueError(f"--orders {args.orders!r}: choose letters among {bench.orders}")


def _cmd_run(args: argparse.Namespace) -> int:
    """One run, or one per seed (``--repeats``) and task order (``--orders``), each in its own directory."""
    _check_orders(args)
    apply_allocator_choice(args.cpu_allocator)
    seeds = [args.seed or 0] if not args.repeats else [(args.seed or 0) + i for i in range(args.repeats)]
    orders = list(args.orders) if args.orders else [args.order]
    if len(seeds) == 1 and len(orders) == 1:
        return _run_one(args)
    base = Path(args.out)
    for order in orders:
        for seed in seeds:
            sub = argparse.Namespace(**vars(args))
            sub.order, sub.seed = order, seed
            if sub.data_seed is None:  # as the authors' repeats: one data draw, the network seed varies
                sub.data_seed = seeds[0]
            sub.out = str(base / "_".join(p for p in (f"order_{order}" if order else "", f"seed_{seed}") if p))
            print(f"== {sub.out}")
            _run_one(sub)
    from .continual.checkpoint import atomic_write_bytes, atomic_write_json
    from .report import build_report

    markdown, table_csv, summary = build_report([base])
    atomic_write_bytes(base / "report.md", (markdown + "\n").encode())
    atomic_write_bytes(base / "report.csv", table_csv.encode())
    atomic_write_json(base / "report.json", summary)
    print(markdown)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .continual.checkpoint import atomic_write_bytes
    from .report import build_report

    markdown, table_csv, summary = build_report(args.dirs)
    for entry in summary["skipped"]:
        print(f"halrp-fast: warning: left out {entry['file']}: {entry['why']}", file=sys.stderr)
    print(markdown)
    if args.csv:
        atomic_write_bytes(Path(args.csv), table_csv.encode())
    if args.md:
        atomic_write_bytes(Path(args.md), (markdown + "\n").encode())
    return 0


def _run_one(args: argparse.Namespace) -> int:
    """One run into ``--out``; a directory this run created is removed again when the run fails before writing
    anything into it."""
    created = not Path(args.out).exists()
    try:
        return _run_one_into(args)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty (a checkpoint to resume from), or already gone
                Path(args.out).rmdir()
        raise


def _run_one_into(args: argparse.Namespace) -> int:
    import torch

    from . import models
    from .continual import HALRPLearner
    from .continual.runner import run_stream
    from .data import benchmarks
    from .plots import plot_accuracy_matrix, plot_ranks

    bench = benchmarks.get(args.benchmark)
    cfg = _config_from_args(bench, args)
    check_device(args.device)
    base = _base_mode(args)
    if args.base_weights is not None:  # the file fits the network: checked before anything is written
        from .continual.base_weights import file_sha256, load_base_weights

        load_base_weights(getattr(models, args.model or bench.model)(**bench.model_kwargs), args.base_weights)
    out = Path(args.out)
    prepare_out_dir(out)
    _CURRENT_OUT[0] = args.out
    torch.manual_seed(cfg.seed)
    batch = args.batch_size or bench.batch_size
    extra = {"order": args.order} if args.order else {}
    if args.subset is not None:
        extra["subset"] = args.subset
    data_seed = cfg.seed if args.data_seed is None else args.data_seed
    tasks = bench.build(batch_size=batch, seed=data_seed, max_per_task=args.max_per_task, data_dir=args.data_dir,
                        **extra)
    if args.tasks is not None:
        if args.tasks > len(tasks):
            raise ValueError(f"--tasks {args.tasks}: the {bench.name} stream has {len(tasks)} tasks")
        tasks = tasks[: args.tasks]
    model_name = args.model or bench.model
    meta = {"benchmark": bench.name, "model": model_name, "batch_size": batch, "order": args.order,
            "data_seed": data_seed,
            "task_names": [t.name for t in tasks], "command": sys.argv, "cpu_allocator": cpu_allocator_state()}
    if args.base_weights is not None:
        meta["base_weights"] = file_sha256(Path(args.base_weights))

    def make_learner():
        torch.manual_seed(cfg.seed)
        net = getattr(models, model_name)(**bench.model_kwargs)
        if args.base_weights is not None:
            load_base_weights(net, args.base_weights)
        return HALRPLearner(net, cfg, head="last", base=base)

    log = (lambda s: None) if args.quiet else print
    tic = time.perf_counter()
    if args.distributed and cfg.compile != "off":
        raise ValueError(f"--compile {cfg.compile} is not supported with --distributed yet: use --compile off")
    if args.task_parallel or args.distributed:
        from .continual.distributed import barrier, init_from_env, launched_by_torchrun, shutdown

        if not launched_by_torchrun():
            raise ValueError("--task-parallel / --distributed run under torchrun, e.g. torchrun --nproc-per-node 2 "
                             "-m halrp_fast.cli run ...")
        ctx = init_from_env(cfg.device)
        cfg.device = ctx.device
        if not ctx.is_main:
            log = lambda s: None  # noqa: E731
        if args.task_parallel:
            from .continual.task_parallel import run_stream_task_parallel

            _, results = run_stream_task_parallel(make_learner, tasks, ctx, out, log=log, meta=meta)
        else:
            _, results = run_stream(make_learner, tasks, out, resume=not args.no_resume, progress=cfg.progress,
                                    log=log, meta=meta, dist=ctx, allow_changes=args.allow_change or (), started=tic)
        # Every process is done communicating: destroy the process group while the interpreter is fully alive
        # (left to interpreter exit, gloo's worker threads can abort a process with std::terminate).  Not on an
        # error: another process may still wait in a collective, and destroying would hang.
        barrier(ctx)
        shutdown(ctx)
        if not ctx.is_main:
            return 0
    else:
        _, results = run_stream(make_learner, tasks, out, resume=not args.no_resume, progress=cfg.progress,
                                log=log, meta=meta, allow_changes=args.allow_change or (), started=tic)
    results["meta"].setdefault("wall_seconds", time.perf_counter() - tic)
    from .continual.checkpoint import atomic_write_json

    atomic_write_json(out / "results.json", results)
    plot_accuracy_matrix(results["acc_matrix"], out / "acc_matrix.png")
    plot_ranks({k: v for k, v in results["ranks"].items() if v}, out / "ranks.png")
    print(format_table(results))
    print(f"results: {out / 'results.json'}, figures: {out / 'acc_matrix.png'}, {out / 'ranks.png'}")
    return 0


def _base_mode(args: argparse.Namespace) -> str:
    """``--base`` with ``--base-weights``: the base of the run (``HALRPLearner(base=...)``)."""
    if args.base_weights is None:
        if args.base not in (None, "learn"):
            raise ValueError(f"--base {args.base} takes the network's weights from --base-weights FILE")
        return "learn"
    if args.base == "learn":
        raise ValueError("--base-weights is the base of the run: --base learn would train another one")
    return args.base or "given"


def _add_run_options(p: argparse.ArgumentParser, demo: bool) -> None:
    from .continual.config import CHANNELS_LAST_CHOICES, COMPILE_MODES, DTYPES
    from .continual.pruning import MODES
    from .data import benchmarks
    from .linalg.scalings import SCALINGS

    if not demo:
        p.add_argument("--benchmark", required=True, choices=sorted(benchmarks.BENCHMARKS),
                       help="the task stream, with its data protocol and the authors' settings as defaults")
    p.add_argument("--model", choices=["lenet", "alexnet", "resnet18"], help="network (default: the benchmark's)")
    p.add_argument("--out", default="runs/demo" if demo else None, required=not demo, help="output directory")
    preset = "default: the benchmark's preset"
    p.add_argument("--epochs", type=integer(1), help=f"epochs per task; the free model's --est-rank-epochs count "
                   f"towards them for tasks after the base ({preset}; PMNIST's: 12)")
    p.add_argument("--lr", type=number(0, low_open=True), help=f"learning rate, restarted in every phase ({preset})")
    p.add_argument("--schedule", choices=["paper", "epoch"], help="learning-rate decay: the paper's per-iteration "
                   "ExponentialLR (default) or --lr-decay per epoch")
    p.add_argument("--lr-decay", dest="lr_decay", type=number(0, low_open=True),
                   help="per-epoch decay with --schedule epoch (default 1: none)")
    p.add_argument("--batch-size", dest="batch_size", type=integer(1), help=f"training batch size ({preset})")
    p.add_argument("--approx-rate", dest="approx_rate", type=number(0, 1, low_open=True),
                   help=f"share of the importance-weighted spectrum the ranks keep, in (0, 1] ({preset}; PMNIST's: "
                   f"0.9)")
    p.add_argument("--upper-rank", dest="upper_rank", type=integer(1),
                   help=f"largest rank of a layer's perturbation ({preset}; PMNIST's: 100)")
    p.add_argument("--rank-mode", dest="rank_mode", choices=["hessian", "flat"],
                   help="hessian: ranks from the global importance-weighted spectrum (default); flat: --upper-rank "
                   "everywhere")
    p.add_argument("--svd", choices=["rsvd", "exact"], help="spectra of the discrepancies: randomized, grown until "
                   "the allocation is exact (default), or full SVDs")
    p.add_argument("--est-rank-epochs", dest="est_rank_epochs", type=integer(0),
                   help=f"epochs of the free model that estimates a task's ranks, ≥ 1 and < --epochs ({preset}; "
                   f"PMNIST's: 1)")
    p.add_argument("--scalings", choices=list(SCALINGS), help="fit of r, s to the free model: least_squares (default) "
                   "or authors (the authors' code, bit for bit)")
    p.add_argument("--l1", type=number(0), help=f"L1 weight on U, V ({preset}; PMNIST's: 1e-6)")
    p.add_argument("--wd", type=number(0), help=f"L2 weight decay ({preset}; PMNIST's: 1e-3)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], help="adam (default) or sgd")
    p.add_argument("--adam-eps", dest="adam_eps", type=number(0, low_open=True),
                   help="Adam's eps (default 1e-9: the authors' tenfold gradients at 1e-8)")
    p.add_argument("--momentum", type=number(0, 1, high_open=True), help="SGD's momentum (default 0.9)")
    p.add_argument("--prune", choices=[*MODES, "none"],
                   help=f"pruning after each task ({preset}; PMNIST's: mixAR_AllLayer)")
    p.add_argument("--prune-value", dest="prune_value", type=number(0), nargs="+",
                   help=f"the pruning mode's threshold(s): one value, or absolute and rate for the mix modes "
                   f"({preset}; PMNIST's: 1e-5 0.40)")
    p.add_argument("--prune-bound", dest="prune_bound", action="store_true",
                   help="bound growth over all tasks (default: the benchmark's preset; PMNIST's: on)")
    p.add_argument("--no-prune-bound", dest="no_prune_bound", action="store_true",
                   help="no growth bound over all tasks")
    p.add_argument("--seed", type=integer(0, 2**32 - 1),
                   help="seeds the network, the batch order and (unless --data-seed) the data (default 0)")
    p.add_argument("--data-seed", dest="data_seed", type=integer(0, 2**32 - 1),
                   help="seeds the data (permutations, splits); --repeats keeps it at the first seed, as the paper's "
                   "repeats do")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--channels-last", dest="channels_last", choices=list(CHANNELS_LAST_CHOICES), default="auto",
                   help="conv weights and activations in the channels-last layout (auto: on for CPU runs of "
                   "conv networks)")
    p.add_argument("--compile", choices=list(COMPILE_MODES),
                   help="run the training passes and evaluation through torch.compile graphs shared by all tasks "
                        "(default: off)")
    p.add_argument("--dtype", choices=list(DTYPES), help="floating-point type of parameters and inputs (default "
                   "float32); float64 for checks where float32 rounding could tip near-ties")
    add_allocator_option(p)
    if not demo:  # the embedded stream needs no files and has one order
        p.add_argument("--data-dir", dest="data_dir", help="where the benchmark's dataset files are (the README's "
                       "benchmark table names them); nothing is downloaded")
        p.add_argument("--order", choices=list("ABCDE"), help="task order of the CIFAR-100 benchmarks (paper's A–E)")
        p.add_argument("--orders", help="run several task orders, e.g. ABCDE, and report OPD / AOPD / MOPD")
    p.add_argument("--repeats", type=integer(1),
                   help="run R network seeds (seed, seed+1, ...) on one data draw and report mean ± std")
    p.add_argument("--tasks", type=integer(1), help="use only the first N tasks")
    p.add_argument("--max-per-task", dest="max_per_task", type=integer(1), help="cap the training samples per task")
    p.add_argument("--subset", type=number(0, 1, low_open=True),
                   help="use this fraction (0, 1] of each task's training data")
    p.add_argument("--base-weights", dest="base_weights", metavar="FILE",
                   help="the network's weights (torch.save(model.state_dict()) or .safetensors), trained elsewhere, as "
                   "the frozen base: every task of the stream is then a perturbation of it with its own head")
    p.add_argument("--base", choices=["learn", "given", "given_head"],
                   help="learn: the first task trains the base (the paper's protocol; default without "
                   "--base-weights); given: --base-weights is the base (default with it); given_head: the first task "
                   "is that network with its own head as it is")
    p.add_argument("--no-resume", dest="no_resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--allow-change", dest="allow_change", action="append", metavar="FIELD",
                   help="resume a checkpoint although FIELD of the run changed (as the refusal names it, e.g. "
                   "config.epochs); repeatable")
    p.add_argument("--no-progress", dest="no_progress", action="store_true",
                   help="no progress bars (by default one over every batch of each phase)")
    p.add_argument("--quiet", action="store_true", help="no per-task lines (the final table is printed)")
    if demo:
        p.set_defaults(data_dir=None, order=None, orders=None, distributed=False, task_parallel=False)
        return
    par = p.add_mutually_exclusive_group()
    par.add_argument("--distributed", action="store_true",
                     help="data parallel under torchrun: every phase on DistributedDataParallel, each global batch "
                     "split over the processes (same result as one process)")
    par.add_argument("--task-parallel", dest="task_parallel", action="store_true",
                     help="under torchrun: the base on rank 0, then tasks 1.. spread over the processes, gathered, "
                     "pruned and evaluated as in a sequential run")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="halrp-fast", description="HALRP continual learning with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="which implementation serves each op on each device, and why")
    env.set_defaults(func=_cmd_env)
    run = sub.add_parser("run", help="run HALRP on a benchmark task stream")
    _add_run_options(run, demo=False)
    run.set_defaults(func=_cmd_run)
    demo = sub.add_parser("demo", help="run on the embedded permuted-digits stream (no download)")
    _add_run_options(demo, demo=True)
    demo.set_defaults(func=_cmd_run, benchmark="pdigits")
    report = sub.add_parser("report", help="merge runs into one table (markdown, CSV) with mean ± std and OPD")
    report.add_argument("dirs", nargs="+", help="run directories (searched for results.json) or results.json files")
    report.add_argument("--csv", help="also write the table as CSV here")
    report.add_argument("--md", help="also write the markdown here")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a usage or data error (one line), 1 an I/O failure during a run (one line), 130
    interrupted (one line saying what was saved and how to resume)."""
    args = build_parser().parse_args(argv)
    _CURRENT_OUT[0] = None
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"halrp-fast: error: {in_cli_words(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"halrp-fast: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted_message(_CURRENT_OUT[0]), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "format_table", "main"]
