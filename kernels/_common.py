"""Helpers shared by the Triton kernels and launchers."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_tile(rows_ptr, tid_ptr, pid, M, HAS_TASKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of M tile ``pid``: ``(mask, rows, tasks, first task, last task)``.

    With tasks, positions index the launcher's task-ordered permutation (``rows_ptr``, ``tid_ptr``), so the
    tile's tasks are the range ``[t_lo, t_hi]``; without, the rows are the positions and every task is 0.
    """
    pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = pos < M
    if HAS_TASKS:
        rows = tl.load(rows_ptr + pos, mask=m_mask, other=0)
        tid = tl.load(tid_ptr + pos, mask=m_mask, other=0)
        t_lo = tl.min(tl.where(m_mask, tid, 2147483647))
        t_hi = tl.max(tl.where(m_mask, tid, -1))
    else:
        rows = pos
        tid = tl.zeros((BLOCK_M,), dtype=tl.int64)
        t_lo = 0
        t_hi = 0
    return m_mask, rows, tid, t_lo, t_hi


@triton.jit
def add_task_products(acc, z, tid, t_lo, t_hi, mat_ptr, stride_t, offs_o, stride_o, offs_r, stride_r, o_mask, r_mask,
                      ALLOW_TF32: tl.constexpr):
    """``acc (BLOCK_M, BLOCK_O) += z[m] · mat[tid[m]]ᵀ`` for the tile's tasks ``t_lo..t_hi``: each row's rank
    block ``z (BLOCK_M, BLOCK_R)`` against its own task's ``mat (T, O, R)`` columns ``offs_o``, ranks ``offs_r``."""
    for t in range(t_lo, t_hi + 1):
        m = tl.load(mat_ptr + t * stride_t + offs_o[None, :] * stride_o + offs_r[:, None] * stride_r,
                    mask=r_mask[:, None] & o_mask[None, :], other=0.0)
        zt = tl.where((tid == t)[:, None], z, 0.0)
        acc += tl.dot(zt, m.to(tl.float32), allow_tf32=ALLOW_TF32)
    return acc


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ ``n`` (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
