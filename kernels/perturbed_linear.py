"""Fused perturbed linear forward, one task or a batch that mixes tasks.

    y[m] = r_t ⊙ ((s_t ⊙ x[m]) Wᵀ) + (x[m] V_t) U_tᵀ + b_t,      t = task of row m

One kernel, grid over (M tiles, N tiles):

* The ``W`` product runs once per M tile whatever the tasks of its rows: ``s`` is applied to the x tile in
  registers, ``r`` and the bias in the epilogue (one broadcast row for a one-task launch, gathered per row in a
  mixed one).
* ``x V`` is accumulated inside the K loop from the x tiles already loaded (ranks ≤ ``fused_rank_max(dtype)``,
  except mixed batches above ``LARGE_M`` rows: see :func:`fuses_rank`); otherwise ``x V`` comes from one GEMM per
  task before the launch and the epilogue walks the rank in chunks, so registers stay bounded for any rank.
* Tiles per M bucket: :func:`linear_tiles`.
* Mixed batches: the launcher orders rows by task (a permutation, no copy of x) so that an M tile holds
  few distinct tasks; the low-rank work loops over the tasks present in the tile only, so the cost grows
  with the number of distinct tasks, not with the batch.

Accumulation is fp32; fp32 inputs use IEEE products unless ``torch.backends.cuda.matmul.allow_tf32``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from halrp_fast._math import rows_by_task

from ._common import add_chunked_task_products, add_task_products, next_pow2, row_tile, rows_of_task, task_rows

# Above this rank x V comes from a separate GEMM: an x V accumulator of BLOCK_M × 64 fp32 values next to the
# BLOCK_M × BLOCK_N one spilled registers on sm_80 and sm_90a at 32- and 64-row tiles even with 8 warps
# (bench/kernel_resources.py); at 32 it does not for fp16/bf16 inputs, whose loaded tiles take half the registers of
# fp32 ones; fp32 inputs fuse up to rank 16 (see fused_rank_max).
FUSED_RANK_MAX = 32
# The epilogue of the unfused path walks the rank in chunks of this many columns (64 spilled; 32 does not).
UNFUSED_RANK_CHUNK = 32


@triton.jit
def _perturbed_linear_fwd_kernel(
    x_ptr, rows_ptr, tid_ptr, w_ptr, r_ptr, s_ptr, u_ptr, v_ptr, b_ptr, xv_ptr, y_ptr, c_ptr, xv_out_ptr,
    M, N, K, RANK,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_rt, stride_st, stride_ut, stride_un, stride_ur, stride_vt, stride_vk, stride_vr, stride_bt,
    stride_xvm, stride_ym,
    HAS_TASKS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr, FUSE_XV: tl.constexpr,
    SAVE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m_mask, rows, tid, t_lo, t_hi = row_tile(rows_ptr, tid_ptr, pid_m, M, HAS_TASKS, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < RANK

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xv = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        mk = m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mk, other=0.0)
        s = task_rows(s_ptr, tid, stride_st, offs_k, m_mask, k_mask, HAS_TASKS)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot((x * s).to(w.dtype), w, allow_tf32=ALLOW_TF32)
        if HAS_RANK and FUSE_XV:
            kr = k_mask[:, None] & r_mask[None, :]
            for t in range(t_lo, t_hi + 1):
                v = tl.load(v_ptr + t * stride_vt + offs_k[:, None] * stride_vk + offs_r[None, :] * stride_vr,
                            mask=kr, other=0.0)
                xv += tl.dot(rows_of_task(x, tid, t, HAS_TASKS).to(v.dtype), v, allow_tf32=ALLOW_TF32)

    mn = m_mask[:, None] & n_mask[None, :]
    if SAVE:  # the unscaled base product and x V, for the backward (same layout as y / (M, RANK))
        tl.store(c_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mn)
        if HAS_RANK and FUSE_XV:
            if pid_n == 0:
                tl.store(xv_out_ptr + rows[:, None] * RANK + offs_r[None, :], xv.to(xv_out_ptr.dtype.element_ty),
                         mask=m_mask[:, None] & r_mask[None, :])
    acc *= task_rows(r_ptr, tid, stride_rt, offs_n, m_mask, n_mask, HAS_TASKS).to(tl.float32)
    if HAS_RANK:
        if FUSE_XV:
            acc = add_task_products(acc, xv, tid, t_lo, t_hi, u_ptr, stride_ut, offs_n, stride_un, offs_r, stride_ur,
                                    n_mask, r_mask, HAS_TASKS, ALLOW_TF32)
        else:
            acc = add_chunked_task_products(acc, xv_ptr, rows, stride_xvm, m_mask, RANK, tid, t_lo, t_hi, u_ptr,
                                            stride_ut, offs_n, stride_un, offs_r, stride_ur, n_mask, HAS_TASKS,
                                            ALLOW_TF32, BLOCK_R)
    if HAS_BIAS:
        acc += task_rows(b_ptr, tid, stride_bt, offs_n, m_mask, n_mask, HAS_TASKS).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mn)


@dataclass(frozen=True)
class LinearTiles:
    """One launch's tiles: rows × output columns × reduction (``block_m × block_n × block_k``), the rank block,
    warps and software-pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int


#: rows from which a launch takes the large tiles (see :func:`linear_tiles`)
LARGE_M = 512


def linear_tiles(M: int, rank: int, fused: bool, dtype: torch.dtype, mixed: bool = False,
                 allow_tf32: bool = False) -> LinearTiles:
    """Tiles by shape bucket (one fixed configuration per bucket: no autotuning sweep, no first-call cost).

    * M ≤ 16 (decode-like) is memory bound on W: a 16-row tile with wide N/K tiles streams W once.
    * M ≤ 512: 32- or 64-row × 64 tiles, BLOCK_K 32, 8 warps: enough programs to fill the GPU at small M.
    * M > 512 on tensor cores (2-byte inputs, or fp32 with TF32 allowed) is compute bound: 128 × 128 output tiles,
      the shape of Triton's own fastest matmul configurations on Ampere and Hopper, 8 warps (two warpgroups for
      Hopper's wgmma); BLOCK_K 64 with 4 stages for 2-byte inputs, 32 with 3 stages for fp32 (32 KiB of shared memory
      a stage either way).  Mixed batches in TF32 take 128 × 64 output tiles: their per-row gathers of r, s and the bias
      next to a 128 × 128 TF32 accumulator spilled 16–120 B per thread on sm_80 and sm_90a.  fp32 without TF32 (FMA
      products) keeps the 64 × 64 tiles: 128 × 128 spilled about 600 B per thread (bench/kernel_resources.py).
    """
    tensor_cores = dtype.itemsize <= 2 or allow_tf32
    block_r = max(16, next_pow2(rank))
    block_r = block_r if fused else min(block_r, UNFUSED_RANK_CHUNK)  # 16 for small unfused ranks: no spills
    if not fused and mixed and not tensor_cores:  # FMA products: 32-wide chunks took a stack frame on sm_90a
        block_r = 16
    if M > LARGE_M and tensor_cores:
        wide = dtype.itemsize <= 2
        if mixed and not wide:  # TF32 with per-row r/s/b gathers: 128 × 128 spilled 16-120 B on sm_80 and sm_90a
            return LinearTiles(128, 64, 32, block_r, 8, 3)
        return LinearTiles(128, 128, 64 if wide else 32, block_r, 8, 4 if wide else 3)
    block_m = 16 if M <= 16 else (32 if M <= 64 else 64)
    return LinearTiles(block_m, 64, 64 if M <= 16 else 32, block_r, linear_warps(block_m, mixed, fused), 3)


def fused_rank_max(dtype: torch.dtype) -> int:
    """The largest rank whose x V (forward) or g U (dgrad) stays in registers: :data:`FUSED_RANK_MAX` for 2-byte
    inputs, 16 for fp32 (rank 32 spilled 24–416 B per thread in fp32, bench/kernel_resources.py)."""
    return FUSED_RANK_MAX if dtype.itemsize <= 2 else 16


def fuses_rank(rank: int, dtype: torch.dtype, M: int, mixed: bool) -> bool:
    """Whether a launch computes x V (forward) or g U (dgrad) inside its main loop: ranks up to
    :func:`fused_rank_max`, except mixed batches of more than :data:`LARGE_M` rows, where the loop over a tile's tasks
    nested in the main loop stopped Triton's software pipelining of the 128-row tiles (one shared-memory stage, no
    asynchronous copies: bench/kernel_resources.py); those take it from one GEMM per task."""
    return rank <= fused_rank_max(dtype) and not (mixed and M > LARGE_M)


def linear_warps(block_m: int, mixed: bool = False, fused: bool = True) -> int:
    """Warps per program: 8 for 32- and 64-row tiles, where 4 warps spilled registers (mixed batches, unfused
    ranks) on sm_80 and sm_90a, and for the 16-row tiles of a mixed batch with an unfused rank (which spilled
    64–80 B); 4 for the other 16-row tiles of small M (bench/kernel_resources.py)."""
    return 4 if block_m <= 16 and (fused or not mixed) else 8


def perturbed_linear_fwd(x: torch.Tensor, weight: torch.Tensor, R: torch.Tensor, S: torch.Tensor, U: torch.Tensor,
                         V: torch.Tensor, B: torch.Tensor | None, task_ids: torch.Tensor | None = None,
                         out: torch.Tensor | None = None, save: bool = False):
    """Launch the kernel.

    Single task (``task_ids=None``): ``x (..., in)``, ``R (out,)``, ``S (in,)``, ``U (out, k)``,
    ``V (in, k)``, ``B (out,)``.  Mixed: ``x (M, ..., in)``, ``task_ids (M,)``, banks ``R (T, out)``,
    ``S (T, in)``, ``U (T, out, k)``, ``V (T, in, k)``, ``B (T, out)``.  ``out`` (optional) receives the
    result, shape ``(..., out)`` contiguous.  Returns ``y``, or with ``save`` ``(y, c, xV)`` where
    ``c = (s ⊙ x) Wᵀ`` has the shape of ``y`` and ``xV (..., k)`` uses each row's own task.
    """
    N, K = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # a view whenever the layout allows it (no hidden copy)
    M = x2.shape[0]
    banked = task_ids is not None
    if not banked:
        R, S, B = R[None], S[None], None if B is None else B[None]
        U, V = U[None], V[None]
    rank = U.shape[-1]
    y = out if out is not None else torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    c = torch.empty_like(y) if save else None
    xv_saved = torch.empty(*lead, rank, dtype=x.dtype, device=x.device) if save else None
    if M == 0 or N == 0:
        return (y, c, xv_saved) if save else y
    y2 = y.view(-1, N)
    R, S = R.contiguous(), S.contiguous()
    B = None if B is None else B.contiguous()
    if banked:
        rows, tids = rows_by_task(task_ids, M // max(x.shape[0], 1))
    else:
        rows = tids = x2  # unused (HAS_TASKS = False)
    fused = fuses_rank(rank, x.dtype, M, banked)
    xv = y2  # unused unless the rank is too large to fuse
    if rank and not fused:
        xv = torch.empty(M, rank, dtype=torch.float32, device=x.device)
        if banked:
            for t in torch.unique(tids).tolist():
                idx = rows[tids == t]
                xv[idx] = x2[idx].float() @ V[t].float()
        else:
            torch.matmul(x2.float(), V[0].float(), out=xv)
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    tiles = linear_tiles(M, rank, fused, x.dtype, banked, allow_tf32)
    grid = (triton.cdiv(M, tiles.block_m), triton.cdiv(N, tiles.block_n))
    _perturbed_linear_fwd_kernel[grid](
        x2, rows, tids, weight, R, S, U, V, B if B is not None else R, xv, y2,
        c.view(-1, N) if save else y2, xv_saved.view(M, rank) if save else y2,
        M, N, K, rank,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        R.stride(0), S.stride(0), U.stride(0), U.stride(1), U.stride(2), V.stride(0), V.stride(1), V.stride(2),
        B.stride(0) if B is not None else 0,
        xv.stride(0), y2.stride(0),
        HAS_TASKS=banked, HAS_BIAS=B is not None, HAS_RANK=rank > 0, FUSE_XV=fused, SAVE=save,
        ALLOW_TF32=allow_tf32,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=tiles.block_r,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if save and rank and not fused:
        xv_saved.view(M, rank).copy_(xv)
    return (y, c, xv_saved) if save else y


def perturbed_linear(x, weight, r, s, U, V, bias, save=False):
    """Provider entry for ``halrp::perturbed_linear``: ``(y, c, xV)``, the last two empty unless ``save``."""
    if save:
        return perturbed_linear_fwd(x, weight, r, s, U, V, bias, save=True)
    return perturbed_linear_fwd(x, weight, r, s, U, V, bias), x.new_empty(0), x.new_empty(0)


def perturbed_linear_mt(x, task_ids, weight, R, S, U, V, B, save=False):
    """Provider entry for ``halrp::perturbed_linear_mt`` (see :func:`perturbed_linear`)."""
    if save:
        return perturbed_linear_fwd(x, weight, R, S, U, V, B, task_ids=task_ids, save=True)
    return perturbed_linear_fwd(x, weight, R, S, U, V, B, task_ids=task_ids), x.new_empty(0), x.new_empty(0)
