"""Single-task inference of a TaskLinear / TaskConv2d: merged-weight path vs the unmerged op.

The merged path (``diag(r) W diag(s) + U Vᵀ``, cached) is what the modules use when no gradient is
needed; the dense layer is the floor.  Run: ``python bench/bench_merged_inference.py``.
"""
from __future__ import annotations

import torch
from _common import environment_line, markdown_table, median_ms
from torch import nn

from halrp_fast.nn import TaskConv2d, TaskLinear


def _perturbed(layer, k):
    t = layer.add_task()
    layer.set_rank(t, 0.01 * torch.randn(layer.out_features, k), 0.01 * torch.randn(layer.in_features, k))
    return t


def _time(dense, layer, t, x) -> tuple[float, float, float]:
    """Median ms of the dense layer, the task's merged-weight path and the unmerged op on ``x``."""
    with torch.no_grad():
        t_dense = median_ms(lambda: dense(x))
        t_merged = median_ms(lambda: layer(x, t))
        r, s, U, V, b = layer.task_tensors(t)
        t_op = median_ms(lambda: layer._op(x, r, s, U, V, b))
    return t_dense, t_merged, t_op


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for n_in, n_out, k in ((3200, 800, 20), (1024, 1024, 64)):
        dense = nn.Linear(n_in, n_out)
        layer = TaskLinear.from_linear(nn.Linear(n_in, n_out))
        t = _perturbed(layer, k)
        for M in (1, 64, 256):
            t_dense, t_merged, t_op = _time(dense, layer, t, torch.randn(M, n_in))
            rows.append([f"linear {n_in}->{n_out} k={k}", M, t_dense, t_merged, t_op, t_merged / t_dense,
                         t_op / t_merged])
    for c_in, c_out, hw, k in ((20, 50, 16, 10), (64, 128, 16, 32)):
        dense = nn.Conv2d(c_in, c_out, 5, padding=2)
        layer = TaskConv2d.from_conv(nn.Conv2d(c_in, c_out, 5, padding=2))
        t = _perturbed(layer, k)
        for N in (1, 64):
            t_dense, t_merged, t_op = _time(dense, layer, t, torch.randn(N, c_in, hw, hw))
            rows.append([f"conv5x5 {c_in}->{c_out} {hw}x{hw} k={k}", N, t_dense, t_merged, t_op, t_merged / t_dense,
                         t_op / t_merged])
    print(environment_line("cpu"))
    print(markdown_table(["layer", "M/N", "dense ms", "merged ms", "unmerged op ms", "merged/dense",
                          "unmerged/merged"], rows))


if __name__ == "__main__":
    main()
