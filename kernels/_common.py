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
def task_rows(ptr, tid, stride_t, offs, m_mask, o_mask, HAS_TASKS: tl.constexpr):
    """Each row's own task vector ``vec[tid[m], offs]`` as ``(BLOCK_M, BLOCK_O)``, zero outside the masks; with one
    task a single ``(1, BLOCK_O)`` row that broadcasts: a 2-D gather there holds one 64-bit address per element in
    registers, which spilled the 128-row tiles (bench/kernel_resources.py)."""
    if HAS_TASKS:
        out = tl.load(ptr + tid[:, None].to(tl.int32) * stride_t + offs[None, :],
                      mask=m_mask[:, None] & o_mask[None, :], other=0.0)
    else:
        out = tl.load(ptr + offs, mask=o_mask, other=0.0)[None, :]
    return out


@triton.jit
def rows_of_task(z, tid, t, HAS_TASKS: tl.constexpr):
    """``z (BLOCK_M, ·)`` with the rows of other tasks than ``t`` zeroed; a one-task launch's tile as it is."""
    if HAS_TASKS:
        out = tl.where((tid == t)[:, None], z, 0.0)
    else:
        out = z
    return out


@triton.jit
def add_task_products(acc, z, tid, t_lo, t_hi, mat_ptr, stride_t, offs_o, stride_o, offs_r, stride_r, o_mask, r_mask,
                      HAS_TASKS: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """``acc (BLOCK_M, BLOCK_O) += z[m] · mat[tid[m]]ᵀ`` for the tile's tasks ``t_lo..t_hi``: each row's rank
    block ``z (BLOCK_M, BLOCK_R)`` against its own task's ``mat (T, O, R)`` columns ``offs_o``, ranks ``offs_r``
    (one task: one product, no row selection).  The product runs in ``mat``'s type, as PyTorch's ``(x V) Uᵀ`` does:
    tensor cores for 2-byte inputs (an fp32 FMA product here spilled the 128-row tiles)."""
    for t in range(t_lo, t_hi + 1):
        m = tl.load(mat_ptr + t * stride_t + offs_o[None, :] * stride_o + offs_r[:, None] * stride_r,
                    mask=r_mask[:, None] & o_mask[None, :], other=0.0)
        acc += tl.dot(rows_of_task(z, tid, t, HAS_TASKS).to(m.dtype), m, allow_tf32=ALLOW_TF32)
    return acc


@triton.jit
def add_chunked_task_products(acc, z_ptr, rows, stride_zm, m_mask, RANK, tid, t_lo, t_hi, mat_ptr, stride_t, offs_o,
                              stride_o, offs_r, stride_r, o_mask, HAS_TASKS: tl.constexpr, ALLOW_TF32: tl.constexpr,
                              BLOCK_R: tl.constexpr):
    """:func:`add_task_products` for a rank of any size: ``z (M, RANK)`` (rows ``rows`` of ``z_ptr``, row stride
    ``stride_zm``) read in ``BLOCK_R``-wide chunks.  One flat loop over (task, chunk) pairs: nested dynamic loops here
    (chunks around tasks) made ptxas outline the inner one and save registers on the stack around it (8 B stack, 128
    registers, in every fp32 and some 2-byte configurations; bench/kernel_resources.py)."""
    chunks = tl.cdiv(RANK, BLOCK_R)
    for i in range(0, (t_hi - t_lo + 1) * chunks):
        t = t_lo + i // chunks
        offs_rr = (i % chunks) * BLOCK_R + offs_r
        rr_mask = offs_rr < RANK
        zc = tl.load(z_ptr + rows[:, None] * stride_zm + offs_rr[None, :], mask=m_mask[:, None] & rr_mask[None, :],
                     other=0.0)
        acc = add_task_products(acc, zc, tid, t, t, mat_ptr, stride_t, offs_o, stride_o, offs_rr, stride_r, o_mask,
                                rr_mask, HAS_TASKS, ALLOW_TF32)
    return acc


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ ``n`` (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
