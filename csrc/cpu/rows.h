// Row kernels shared by the CPU ops: one row of x through a layer with a rank-k perturbation.
//
//   c = W (s ⊙ x)                      (base_row_f32)
//   z = Vᵀ x,  y = r ⊙ c + b + U z     (lowrank_row*)
//
// W (out, in), U (out, k), V (in, k) row-major; r, c, b, y (out,); x, s (in,); z (k,).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

namespace halrp {

// One row of a small task block: z = x V[t] (stored) and y = R[t] ⊙ c + B[t] + U[t] z, fp32+ accumulation.
template <typename T>
__attribute__((always_inline)) inline void lowrank_row(const T* xr, const T* Vt, const T* Ut, const T* rr, const T* cr,
                                                       const T* br, int64_t in, int64_t out, int64_t k,
                                                       at::opmath_type<T>* zr, T* zout, T* yr) {
  using acc_t = at::opmath_type<T>;
  for (int64_t j = 0; j < k; ++j) zr[j] = acc_t(0);
  for (int64_t i = 0; i < in; ++i) {
    const acc_t xi = static_cast<acc_t>(xr[i]);
    const T* vrow = Vt + i * k;
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) zr[j] += xi * static_cast<acc_t>(vrow[j]);
  }
  for (int64_t j = 0; j < k; ++j) zout[j] = static_cast<T>(zr[j]);
  for (int64_t o = 0; o < out; ++o) {
    const T* urow = Ut + o * k;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < k; ++j) sum += static_cast<acc_t>(urow[j]) * zr[j];
    const acc_t v = static_cast<acc_t>(rr[o]) * static_cast<acc_t>(cr[o]) + (br ? static_cast<acc_t>(br[o]) : acc_t(0));
    yr[o] = static_cast<T>(v + sum);
  }
}

// lowrank_row with the rank known at compile time: the per-output dot over the k ranks unrolls into a few vector
// instructions instead of a loop with its own setup, which dominates at small k.
template <typename T, int K>
__attribute__((always_inline)) inline void lowrank_row_fixed(const T* xr, const T* Vt, const T* Ut, const T* rr,
                                                             const T* cr, const T* br, int64_t in, int64_t out, T* zout,
                                                             T* yr) {
  using acc_t = at::opmath_type<T>;
  acc_t zr[K] = {};
  for (int64_t i = 0; i < in; ++i) {
    const acc_t xi = static_cast<acc_t>(xr[i]);
    const T* vrow = Vt + i * K;
    for (int j = 0; j < K; ++j) zr[j] += xi * static_cast<acc_t>(vrow[j]);
  }
  for (int j = 0; j < K; ++j) zout[j] = static_cast<T>(zr[j]);
  for (int64_t o = 0; o < out; ++o) {
    const T* urow = Ut + o * K;
    acc_t sum = 0;
    for (int j = 0; j < K; ++j) sum += static_cast<acc_t>(urow[j]) * zr[j];
    const acc_t v = static_cast<acc_t>(rr[o]) * static_cast<acc_t>(cr[o]) + (br ? static_cast<acc_t>(br[o]) : acc_t(0));
    yr[o] = static_cast<T>(v + sum);
  }
}

// lowrank_row for float32: AVX2/FMA for ranks 8, 16, 24, 32 on CPUs that have it, unrolled forms up to rank 16,
// else the generic loop (rank 0 included: y = r ⊙ c + b).  `zr` is scratch of k floats; `yr` may alias `cr`.
void lowrank_row_f32(const float* xr, const float* Vt, const float* Ut, const float* rr, const float* cr,
                     const float* br, int64_t in, int64_t out, int64_t k, float* zr, float* zout, float* yr);

// c[o] = Σ_i W[o, i] xs[i] for the outputs o in [lo, hi) (xs = s ⊙ x, computed by the caller), fp32 accumulation.
void base_row_f32(const float* W, const float* xs, int64_t in, int64_t lo, int64_t hi, float* c);

}  // namespace halrp
