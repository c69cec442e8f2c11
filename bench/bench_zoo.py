"""Inference cost of converted zoo models against the plain model they came from.

A converted model serving a later task runs every task-aware layer through its cached merged weight, so beyond
the plain model it costs only the library's per-layer bookkeeping (task selection, cache lookups, the per-task
normalisation and head modules).  The exported task 1 (``export_task``: a plain model holding the same merged
weights) is the floor of the same arithmetic without the library.  All are timed in the same paired rounds (order
rotating), no gradient, eval mode.

``python bench/bench_zoo.py [--threads 2] [--batch 16] [--rounds 60]`` prints a markdown table; needs torchvision
(and timm for the timm row).
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_line, markdown_table, paired_median_ms, parse_args  # noqa: E402

import halrp_fast as hf  # noqa: E402


def _models(batch: int) -> dict:
    import torchvision as tv

    out = {"torchvision resnet18, 64×64": (lambda: tv.models.resnet18(num_classes=10), "fc",
                                            torch.randn(batch, 3, 64, 64)),
           # vit_tiny's shape (12 layers, width 192, 3 heads) in torchvision's VisionTransformer: its attention is
           # nn.MultiheadAttention, run per task through the reparametrized wrapper
           "torchvision VisionTransformer (tiny), 64×64": (
               lambda: tv.models.VisionTransformer(image_size=64, patch_size=16, num_layers=12, num_heads=3,
                                                   hidden_dim=192, mlp_dim=768, num_classes=10), "heads.head",
               torch.randn(batch, 3, 64, 64))}
    try:
        import timm

        out["timm vit_tiny_patch16, 64×64"] = (
            lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64), "head",
            torch.randn(batch, 3, 64, 64))
    except ImportError:
        pass
    return out


def _with_task(model: hf.TaskModel, rank: int) -> int:
    t = model.add_task(10)
    gen = torch.Generator().manual_seed(0)
    for layer in model.perturbed_layers().values():
        layer.set_rank(t, 0.01 * torch.randn(layer.out_features, rank, generator=gen),
                       0.01 * torch.randn(layer.in_features, rank, generator=gen))
    return t


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    args = parse_args(parser, argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, (build, head, x) in _models(args.batch).items():
        torch.manual_seed(0)
        plain = build().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = hf.convert(plain, head=head).eval()
        t = _with_task(model, args.rank)
        exported = model.export_task(t).eval()
        served = copy.deepcopy(model)  # its own weights, like every model timed here; in a serving session throughout
        with torch.no_grad(), served.serving():
            model(x, t)  # merge and cache the task's weights once
            t_plain, t_export, t_base, t_task, t_serving = paired_median_ms(
                [lambda: plain(x), lambda: exported(x), lambda: model(x, 0), lambda: model(x, t), lambda: served(x, t)],
                rounds=args.rounds)
        rows.append([name, len(model.perturbed_layers()), t_plain, t_export, t_base, t_task, t_serving,
                     t_task / t_plain, t_serving / t_plain, t_serving / t_export, "≤ 1.05"])
    print(environment_line("cpu") + f", batch {args.batch}, rank {args.rank}, medians of {args.rounds} paired rounds")
    print(markdown_table(["model", "task-aware layers", "plain ms", "exported task 1 ms", "converted, task 0 ms",
                          "converted, task 1 ms", "task 1 in serving() ms", "task 1 / plain",
                          "serving() / plain", "serving() / exported", "target"], rows))


if __name__ == "__main__":
    main()
