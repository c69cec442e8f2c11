"""Figures of a run: the accuracy matrix heatmap and the ranks per task and layer."""
from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_accuracy_matrix(acc_matrix: list[list[float | None]], path: str | Path) -> None:
    """Heatmap of ``A[i, j]`` (row: after training task i; column: task j), values annotated."""
    import numpy as np

    plt = _pyplot()
    A = np.array([[np.nan if v is None else v for v in row] for row in acc_matrix], dtype=float)
    T = A.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * T, 0.8 + 0.6 * T))
    im = ax.imshow(A, vmin=np.nanmin(A) if np.isfinite(A).any() else 0, vmax=100, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if np.isfinite(A[i, j]):
                ax.text(j, i, f"{A[i, j]:.1f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_title("test accuracy A[i, j] (%)")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, Path(path))
    plt.close(fig)


def plot_ranks(ranks: dict[str, dict[str, int]], path: str | Path) -> None:
    """Grouped bars: the rank of every layer for every task ≥ 1."""
    import numpy as np

    plt = _pyplot()
    tasks = [t for t in ranks if ranks[t]]
    layers = list(ranks[tasks[0]]) if tasks else []
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(tasks) * max(1, len(layers)) / 2), 3.2))
    width = 0.8 / max(1, len(layers))
    x = np.arange(len(tasks))
    for i, layer in enumerate(layers):
        ax.bar(x + i * width, [ranks[t].get(layer, 0) for t in tasks], width, label=layer)
    ax.set_xticks(x + width * (len(layers) - 1) / 2)
    ax.set_xticklabels(tasks)
    ax.set_xlabel("task")
    ax.set_ylabel("rank of U Vᵀ")
    ax.set_title("ranks per task and layer (after pruning)")
    if layers:
        ax.legend(fontsize=7, ncol=min(4, len(layers)))
    _save(fig, Path(path))
    plt.close(fig)
