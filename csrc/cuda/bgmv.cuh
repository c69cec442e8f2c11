// Mixed-task low-rank kernels for small batches (BGMV style: one batched matrix-vector product per row, each
// row reading the bank entry of its own task).  Self-contained CUDA: no torch headers, so the kernels compile
// (and are compile-checked) on their own.
//
//   shrink:  z[m, j]  = Σ_i x[m, i] · V[t_m, i, j]                       j < rank(t_m), else 0
//   expand:  y[m, o]  = R[t_m, o] · c[m, o] + Σ_j U[t_m, o, j] · z[m, j] + B[t_m, o]
//
// x (M, in), c (M, out) row-major with leading dimensions; banks V (T, in, k), U (T, out, k), R (T, out),
// B (T, out) contiguous.  `ranks` (T,) may be null (every task uses the full k of the zero-padded bank);
// otherwise columns j ≥ ranks[t] are skipped.  Accumulation is fp32 for fp16/bf16/fp32 inputs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace halrp {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Grid (M, ceil(k / 32)), block (32, WARPS).  Lane = rank column (coalesced reads of a row of V[t]), warps
// split the `in` dimension; partial sums meet in shared memory.  z is fp32 (M, k).
template <typename T, int WARPS>
__global__ void bgmv_shrink_kernel(const T* __restrict__ x, int64_t ldx, const int64_t* __restrict__ task_ids,
                                   const T* __restrict__ V, const int32_t* __restrict__ ranks, int64_t in, int64_t k,
                                   float* __restrict__ z) {
  __shared__ float partial[WARPS][kWarp];
  const int64_t m = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kWarp + threadIdx.x;
  const int64_t t = task_ids[m];
  const int64_t rank = ranks ? ranks[t] : k;
  float acc = 0.f;
  if (j < rank) {
    const T* xr = x + m * ldx;
    const T* Vt = V + t * in * k;
    for (int64_t i = threadIdx.y; i < in; i += WARPS) acc += to_float(xr[i]) * to_float(Vt[i * k + j]);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < k) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += partial[w][threadIdx.x];
    z[m * k + j] = sum;
  }
}

// Grid (M, ceil(out / (WARPS · ROWS))), block (32, WARPS).  Each warp produces ROWS outputs o: lanes run over
// the rank (coalesced reads of a row of U[t]), a warp reduction gives Σ_j U[t, o, j] z[m, j], and lane 0 writes
// the epilogue.  z[m, :] is staged in shared memory (RANK_TILE floats: the rank bucket of the launch).
template <typename T, int WARPS, int ROWS, int RANK_TILE>
__global__ void bgmv_expand_kernel(const float* __restrict__ z, const T* __restrict__ c, int64_t ldc,
                                   const int64_t* __restrict__ task_ids, const T* __restrict__ U,
                                   const T* __restrict__ R, const T* __restrict__ B, const int32_t* __restrict__ ranks,
                                   int64_t out, int64_t k, T* __restrict__ y, int64_t ldy) {
  __shared__ float zs[RANK_TILE];
  const int64_t m = blockIdx.x;
  const int64_t t = task_ids[m];
  const int64_t rank = ranks ? (ranks[t] < k ? ranks[t] : k) : k;
  const int tid = threadIdx.y * kWarp + threadIdx.x;
  for (int64_t j = tid; j < RANK_TILE; j += WARPS * kWarp) zs[j] = j < rank ? z[m * k + j] : 0.f;
  __syncthreads();
  const T* Ut = U + t * out * k;
  const int64_t first = (static_cast<int64_t>(blockIdx.y) * WARPS + threadIdx.y) * ROWS;
  for (int r = 0; r < ROWS; ++r) {
    const int64_t o = first + r;
    if (o >= out) break;
    float acc = 0.f;
    for (int64_t j = threadIdx.x; j < rank; j += kWarp) acc += to_float(Ut[o * k + j]) * zs[j];
    acc = warp_sum(acc);
    if (threadIdx.x == 0) {
      float v = to_float(R[t * out + o]) * to_float(c[m * ldc + o]) + acc;
      if (B) v += to_float(B[t * out + o]);
      y[m * ldy + o] = from_float<T>(v);
    }
  }
}

// Launchers (host side).  RANK_TILE buckets: 32, 64, 128, 256; the caller picks the smallest ≥ k.
template <typename T>
cudaError_t bgmv_shrink(const T* x, int64_t ldx, const int64_t* task_ids, const T* V, const int32_t* ranks,
                        int64_t M, int64_t in, int64_t k, float* z, cudaStream_t stream) {
  if (M == 0 || k == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>((k + kWarp - 1) / kWarp));
  bgmv_shrink_kernel<T, kWarps><<<grid, dim3(kWarp, kWarps), 0, stream>>>(x, ldx, task_ids, V, ranks, in, k, z);
  return cudaGetLastError();
}

template <typename T, int RANK_TILE>
cudaError_t bgmv_expand(const float* z, const T* c, int64_t ldc, const int64_t* task_ids, const T* U, const T* R,
                        const T* B, const int32_t* ranks, int64_t M, int64_t out, int64_t k, T* y, int64_t ldy,
                        cudaStream_t stream) {
  if (M == 0 || out == 0) return cudaSuccess;
  constexpr int kWarps = 4, kRows = 4;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>((out + kWarps * kRows - 1) / (kWarps * kRows)));
  bgmv_expand_kernel<T, kWarps, kRows, RANK_TILE>
      <<<grid, dim3(kWarp, kWarps), 0, stream>>>(z, c, ldc, task_ids, U, R, B, ranks, out, k, y, ldy);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace halrp
