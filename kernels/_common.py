"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ ``n`` (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_tasks(task_ids: torch.Tensor, rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ordered by task: ``(rows, tasks)`` with ``rows[p]`` the row of ``x`` at position ``p`` and
    ``tasks[p]`` its task, ascending, so that a tile of consecutive positions holds few distinct tasks.

    ``rows_per_sample`` > 1 when ``x`` is ``(M, L, in)``: every sample's L rows carry its task.
    """
    ids = task_ids if rows_per_sample == 1 else task_ids.repeat_interleave(rows_per_sample)
    rows = torch.argsort(ids, stable=True)
    return rows, ids.index_select(0, rows)
