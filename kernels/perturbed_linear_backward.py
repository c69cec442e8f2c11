"""Backward of the perturbed linear layer, one task or mixed tasks.

With ``g = ∂L/∂y``, rows ordered by task (``t`` = a row's task) and ``W`` frozen:

    gx  = (g ⊙ r_t) W                      (M, in)     gradient w.r.t. s ⊙ x
    gu  = g U_t                            (M, k)
    dx  = s_t ⊙ gx + gu V_tᵀ               — one Triton kernel ("dgrad") writes dx, and gx / gu when asked
    ds_t = Σ_rows(t) gx ⊙ x,  dr_t = Σ_rows(t) g ⊙ c,  db_t = Σ_rows(t) g
    dU_t = g_tᵀ (x V)_t,      dV_t = x_tᵀ gu_t

The per-task sums and the two small rank-k GEMMs run on each task's contiguous segment of the sorted rows,
one task after another: deterministic (no atomics) and proportional to the number of distinct tasks.
``c`` and ``x V`` come from the forward when it saved them, else they are recomputed here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from halrp_fast._math import row_task_ids, rows_by_task

from ._common import add_chunked_task_products, add_task_products, row_tile, rows_of_task, task_rows
from .perturbed_linear import fuses_rank, linear_tiles


@triton.jit
def _perturbed_linear_dgrad_kernel(
    g_ptr, rows_ptr, tid_ptr, w_ptr, r_ptr, s_ptr, u_ptr, v_ptr, gu_in_ptr,
    dx_ptr, gx_ptr, gu_out_ptr,
    M, N, K, RANK,
    stride_gm, stride_wn, stride_wk, stride_rt, stride_st, stride_ut, stride_un, stride_ur,
    stride_vt, stride_vk, stride_vr, stride_dxm,
    HAS_TASKS: tl.constexpr, HAS_RANK: tl.constexpr, FUSE_GU: tl.constexpr, WRITE_DX: tl.constexpr,
    WRITE_GX: tl.constexpr, WRITE_GU: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    m_mask, rows, tid, t_lo, t_hi = row_tile(rows_ptr, tid_ptr, pid_m, M, HAS_TASKS, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < RANK

    gx = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    gu = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        mn = m_mask[:, None] & n_mask[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_gm + offs_n[None, :], mask=mn, other=0.0)
        r = task_rows(r_ptr, tid, stride_rt, offs_n, m_mask, n_mask, HAS_TASKS)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        gx += tl.dot((g * r).to(w.dtype), w, allow_tf32=ALLOW_TF32)
        if HAS_RANK and FUSE_GU:
            for t in range(t_lo, t_hi + 1):
                u = tl.load(u_ptr + t * stride_ut + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                            mask=n_mask[:, None] & r_mask[None, :], other=0.0)
                gu += tl.dot(rows_of_task(g, tid, t, HAS_TASKS).to(u.dtype), u, allow_tf32=ALLOW_TF32)

    mk = m_mask[:, None] & k_mask[None, :]
    if WRITE_GX:
        tl.store(gx_ptr + rows[:, None] * K + offs_k[None, :], gx, mask=mk)
    if WRITE_GU and FUSE_GU:
        if pid_k == 0:
            tl.store(gu_out_ptr + rows[:, None] * RANK + offs_r[None, :], gu, mask=m_mask[:, None] & r_mask[None, :])
    if WRITE_DX:
        dx = gx * task_rows(s_ptr, tid, stride_st, offs_k, m_mask, k_mask, HAS_TASKS).to(tl.float32)
        if HAS_RANK:
            if FUSE_GU:
                dx = add_task_products(dx, gu, tid, t_lo, t_hi, v_ptr, stride_vt, offs_k, stride_vk, offs_r,
                                       stride_vr, k_mask, r_mask, HAS_TASKS, ALLOW_TF32)
            else:
                dx = add_chunked_task_products(dx, gu_in_ptr, rows, RANK, m_mask, RANK, tid, t_lo, t_hi, v_ptr,
                                               stride_vt, offs_k, stride_vk, offs_r, stride_vr, k_mask, HAS_TASKS,
                                               ALLOW_TF32, BLOCK_R)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mk)


def _segments(tids: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(task, start, end)`` of each task's run in the sorted task order."""
    uniq, counts = torch.unique_consecutive(tids, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    starts = [0] + ends[:-1]
    return list(zip(uniq.tolist(), starts, ends, strict=True))


def perturbed_linear_bwd(grad, x, weight, R, S, U, V, c, xv, has_bias, needs, task_ids=None):
    """Gradients ``(dx, dweight, dR, dS, dU, dV, dB)``; single task when ``task_ids`` is None (then R, S, U, V
    are the task's own ``r (out,)``, ``s (in,)``, ``U (out, k)``, ``V (in, k)`` and so are the gradients)."""
    from halrp_fast._math import is_saved

    nx, nw, nr, ns, nU, nV, nb = needs
    N, K = weight.shape
    banked = task_ids is not None
    if not banked:
        R, S, U, V = R[None], S[None], U[None], V[None]
    T, rank = R.shape[0], U.shape[-1]
    x2 = x.reshape(-1, K)
    g = grad.reshape(-1, N).contiguous()
    M = x2.shape[0]
    if banked:
        rows, tids = rows_by_task(task_ids, M // max(x.shape[0], 1))
        row_task = row_task_ids(task_ids, M // max(x.shape[0], 1))  # the task of every row, in row order
    else:
        rows = torch.arange(M, device=x.device)
        tids = row_task = torch.zeros(M, dtype=torch.int64, device=x.device)
    c = c.reshape(M, N) if is_saved(c, (*x.shape[:-1], N)) else None
    xv = xv.reshape(M, rank) if is_saved(xv, (*x.shape[:-1], rank)) else None
    R, S = R.contiguous(), S.contiguous()
    empty = x.new_empty(0)
    dx = torch.empty(M, K, dtype=x.dtype, device=x.device) if nx else None
    gx = torch.empty(M, K, dtype=torch.float32, device=x.device) if ns else None
    gu = torch.empty(M, rank, dtype=torch.float32, device=x.device) if (nV and rank) else None
    fused = fuses_rank(rank, x.dtype, M, banked)
    gu_in = empty
    if rank and not fused and (nx or nV):  # rank too large for registers: g U from one GEMM per task
        gu = gu if gu is not None else torch.empty(M, rank, dtype=torch.float32, device=x.device)
        for t, a, b in _segments(tids):
            idx = rows[a:b]
            gu[idx] = g[idx].float() @ U[t].float()
        gu_in = gu
    if M and (nx or ns or (nV and rank and fused)):
        # dgrad: the weight's rows (N) are the reduction, its columns (K) the output: the forward's tiles with the
        # roles of N and K swapped (small M: 32 reduction rows × 64 output columns)
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        tiles = linear_tiles(M, rank, fused, x.dtype, banked, allow_tf32)
        block_m, block_r = tiles.block_m, tiles.block_r
        block_n, block_k = (tiles.block_k, tiles.block_n) if tiles.block_m == 128 else (32, 64)
        grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
        # fp32 FMA products, mixed batch, unfused rank: a third stage took a 16 B stack frame (M = 4096, sm_80)
        stages = 2 if banked and not fused and not allow_tf32 and x.dtype == torch.float32 else tiles.num_stages
        dummy = g
        _perturbed_linear_dgrad_kernel[grid](
            g, rows, tids, weight, R, S, U, V, gu_in if gu_in.numel() else dummy,
            dx if dx is not None else dummy, gx if gx is not None else dummy,
            gu if (gu is not None and fused) else dummy,
            M, N, K, rank,
            g.stride(0), weight.stride(0), weight.stride(1), R.stride(0), S.stride(0), U.stride(0), U.stride(1),
            U.stride(2), V.stride(0), V.stride(1), V.stride(2), dx.stride(0) if dx is not None else 0,
            HAS_TASKS=banked, HAS_RANK=rank > 0, FUSE_GU=fused, WRITE_DX=nx, WRITE_GX=ns,
            WRITE_GU=gu is not None and fused, ALLOW_TF32=allow_tf32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
            num_warps=tiles.num_warps, num_stages=stages,
        )
    dw = (g * R[row_task]).T @ (x2 * S[row_task]) if nw else None
    dR = torch.zeros_like(R) if nr else None
    dS = torch.zeros_like(S) if ns else None
    dU = torch.zeros_like(U) if nU else None
    dV = torch.zeros_like(V) if nV else None
    dB = torch.zeros(T, N, dtype=g.dtype, device=g.device) if (nb and has_bias) else None
    if nr and c is None:
        c = F.linear(x2 * S[row_task], weight)
    for t, a, b in _segments(tids) if M else []:
        idx = rows[a:b]
        gt, xt = g[idx], x2[idx]
        if ns:
            dS[t] = (gx[idx] * xt.float()).sum(0).to(dS.dtype)
        if nr:
            dR[t] = (gt * c[idx]).sum(0)
        if dB is not None:
            dB[t] = gt.sum(0)
        if rank and nU:
            dU[t] = gt.T @ (xv[idx] if xv is not None else xt @ V[t])
        if rank and nV:
            dV[t] = (xt.float().T @ gu[idx]).to(dV.dtype)
    out = [None if dx is None else dx.reshape(x.shape), dw, dR, dS, dU, dV, dB]
    if not banked:
        out = [out[0], out[1]] + [None if t is None else t[0] for t in out[2:]]
    return tuple(x.new_empty(0) if t is None else t for t in out)  # a distinct placeholder per slot


def perturbed_linear_backward(grad, x, weight, r, s, U, V, c, xv, has_bias, needs):
    """Provider entry for ``halrp::perturbed_linear_backward``."""
    return perturbed_linear_bwd(grad, x, weight, r, s, U, V, c, xv, has_bias, needs)


def perturbed_linear_mt_backward(grad, x, task_ids, weight, R, S, U, V, c, xv, has_bias, needs):
    """Provider entry for ``halrp::perturbed_linear_mt_backward``."""
    return perturbed_linear_bwd(grad, x, weight, R, S, U, V, c, xv, has_bias, needs, task_ids=task_ids)
