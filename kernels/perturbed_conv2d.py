"""Perturbed conv2d, one task or a batch that mixes tasks (one task per image).

The base convolution ``c = conv(s ⊙ x, W)`` stays on cuDNN (its algorithms beat anything written here)
and the low-rank branch reduces to ``pooled = Σ_window(Vᵀ · x)``, a k-channel tensor (k ≪ C_out).  One
Triton kernel then fuses everything after them in a single pass over the output:

    y[n, o, p] = r_t[o] · c[n, o, p] + Σ_j U_t[o, j] · pooled[n, j, p] + b_t[o],     t = task of image n

instead of separate scale, 1×1-conv, add and bias passes (three reads and writes of an N×C_out×H×W
tensor saved).  Grid: (image, C_out tiles, pixel tiles); the rank is walked in chunks of ``BLOCK_R``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from halrp_fast._math import lowrank_pool, per_channel, task_groups

from ._common import next_pow2


@triton.jit
def _conv_epilogue_kernel(
    c_ptr, p_ptr, tid_ptr, r_ptr, u_ptr, b_ptr, y_ptr,
    O, P, RANK,
    stride_cn, stride_co, stride_pn, stride_pk, stride_rt, stride_ut, stride_uo, stride_ur, stride_bt,
    stride_yn, stride_yo,
    HAS_TASKS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    n = tl.program_id(0)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_mask = offs_o < O
    p_mask = offs_p < P
    t = tl.load(tid_ptr + n) if HAS_TASKS else 0
    op_mask = o_mask[:, None] & p_mask[None, :]
    c = tl.load(c_ptr + n * stride_cn + offs_o[:, None] * stride_co + offs_p[None, :], mask=op_mask, other=0.0)
    r = tl.load(r_ptr + t * stride_rt + offs_o, mask=o_mask, other=0.0)
    acc = c.to(tl.float32) * r.to(tl.float32)[:, None]
    if HAS_RANK:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, RANK, BLOCK_R):
            rr = r0 + offs_r
            rr_mask = rr < RANK
            u = tl.load(u_ptr + t * stride_ut + offs_o[:, None] * stride_uo + rr[None, :] * stride_ur,
                        mask=o_mask[:, None] & rr_mask[None, :], other=0.0)
            pooled = tl.load(p_ptr + n * stride_pn + rr[:, None] * stride_pk + offs_p[None, :],
                             mask=rr_mask[:, None] & p_mask[None, :], other=0.0)
            # in the operands' own type (fp16/bf16: tensor cores), accumulated in fp32
            acc += tl.dot(u.to(pooled.dtype), pooled, allow_tf32=ALLOW_TF32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + t * stride_bt + offs_o, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + n * stride_yn + offs_o[:, None] * stride_yo + offs_p[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=op_mask)


def conv_epilogue(c: torch.Tensor, pooled: torch.Tensor, R: torch.Tensor, U: torch.Tensor, B: torch.Tensor | None,
                  task_ids: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = r ⊙ c + U · pooled + b`` per image.

    ``c (N, O, H, W)``, ``pooled (N, k, H, W)``; single task: ``R (O,)``, ``U (O, k)``, ``B (O,)``; mixed:
    ``task_ids (N,)`` and banks ``R (T, O)``, ``U (T, O, k)``, ``B (T, O)``.
    """
    N, O, H, W = c.shape
    banked = task_ids is not None
    if not banked:
        R, U, B = R[None], U[None], None if B is None else B[None]
    c3 = c.reshape(N, O, H * W).contiguous()
    p3 = pooled.reshape(N, pooled.shape[1], H * W).contiguous()
    R = R.contiguous()
    B = None if B is None else B.contiguous()
    y = out if out is not None else torch.empty_like(c, memory_format=torch.contiguous_format)
    if N == 0 or O == 0 or H * W == 0:
        return y
    y3 = y.view(N, O, H * W)
    rank = U.shape[-1]
    # 64 channels × 64 pixels: 32 fp32 accumulator values per thread with 4 warps; rank in chunks of ≤ 32.
    block_o, block_p = min(64, max(16, next_pow2(O))), min(64, max(16, next_pow2(H * W)))
    block_r = min(32, max(16, next_pow2(rank)))
    grid = (N, triton.cdiv(O, block_o), triton.cdiv(H * W, block_p))
    _conv_epilogue_kernel[grid](
        c3, p3, task_ids if banked else c3, R, U, B if B is not None else R, y3,
        O, H * W, rank,
        c3.stride(0), c3.stride(1), p3.stride(0), p3.stride(1), R.stride(0), U.stride(0), U.stride(1), U.stride(2),
        B.stride(0) if B is not None else 0, y3.stride(0), y3.stride(1),
        HAS_TASKS=banked, HAS_BIAS=B is not None, HAS_RANK=rank > 0,
        ALLOW_TF32=bool(torch.backends.cuda.matmul.allow_tf32),
        BLOCK_O=block_o, BLOCK_P=block_p, BLOCK_R=block_r,
    )
    return y


def perturbed_conv2d(x, weight, r, s, U, V, bias, save, stride, padding, dilation):
    """Provider entry for ``halrp::perturbed_conv2d``: base conv by the library, fused epilogue here."""
    c = F.conv2d(x * per_channel(s), weight, None, stride, padding, dilation)
    pooled = lowrank_pool(x, V, weight.shape[-2:], stride, padding, dilation) if U.shape[1] else \
        c.new_zeros(c.shape[0], 0, *c.shape[2:])
    y = conv_epilogue(c, pooled, r, U, bias)
    return (y, c, pooled) if save else (y, x.new_empty(0), x.new_empty(0))


def perturbed_conv2d_mt(x, task_ids, weight, R, S, U, V, B, save, stride, padding, dilation):
    """Provider entry for ``halrp::perturbed_conv2d_mt``: the low-rank pooling loops over distinct tasks."""
    c = F.conv2d(x * per_channel(S[task_ids]), weight, None, stride, padding, dilation)
    k = U.shape[2]
    pooled = c.new_zeros(c.shape[0], k, *c.shape[2:])
    if k:
        for t, idx in task_groups(task_ids):
            part = lowrank_pool(x.index_select(0, idx), V[t], weight.shape[-2:], stride, padding, dilation)
            pooled.index_copy_(0, idx, part)
    y = conv_epilogue(c, pooled, R, U, B, task_ids=task_ids)
    return (y, c, pooled) if save else (y, x.new_empty(0), x.new_empty(0))
