// The float32 row kernels of rows.h: AVX2/FMA forms chosen at run time by the CPU, portable forms elsewhere.
#include "rows.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace halrp {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// The float32 row for ranks 8, 16, 24, 32 with AVX2/FMA.  The expand y[o] = Σ_j U[o, j] z[j] is a dot over the ranks
// per output: one horizontal sum each in the portable form.  Here eight outputs at a time: their 8×K block of U (rows
// contiguous) times z, and the eight horizontal sums done together (two rounds of hadd and a lane exchange).
template <int C>  // K = 8·C ranks
__attribute__((target("avx2,fma"))) void lowrank_row_f32_avx2(const float* xr, const float* Vt, const float* Ut,
                                                               const float* rr, const float* cr, const float* br,
                                                               int64_t in, int64_t out, float* zout, float* yr) {
  constexpr int K = 8 * C;
  __m256 z[C];
  for (int c = 0; c < C; ++c) z[c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < in; ++i) {
    const __m256 xi = _mm256_set1_ps(xr[i]);
    for (int c = 0; c < C; ++c) z[c] = _mm256_fmadd_ps(xi, _mm256_loadu_ps(Vt + i * K + 8 * c), z[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(zout + 8 * c, z[c]);
  int64_t o = 0;
  for (; o + 8 <= out; o += 8) {
    __m256 p[8];
    for (int q = 0; q < 8; ++q) {
      const float* u = Ut + (o + q) * K;
      p[q] = _mm256_mul_ps(_mm256_loadu_ps(u), z[0]);
      for (int c = 1; c < C; ++c) p[q] = _mm256_fmadd_ps(_mm256_loadu_ps(u + 8 * c), z[c], p[q]);
    }
    // hadd pairs: [p0.., p1.., p2.., p3.. | ...] → the four 128-bit halves hold the half sums of p0..p3 and p4..p7
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(p[4], p[5]), _mm256_hadd_ps(p[6], p[7]));
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(rr + o), _mm256_loadu_ps(cr + o));
    if (br) v = _mm256_add_ps(v, _mm256_loadu_ps(br + o));
    _mm256_storeu_ps(yr + o, _mm256_add_ps(v, sums));
  }
  float zs[K];
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(zs + 8 * c, z[c]);
  for (; o < out; ++o) {
    float sum = 0;
    for (int j = 0; j < K; ++j) sum += Ut[o * K + j] * zs[j];
    yr[o] = rr[o] * cr[o] + (br ? br[o] : 0.f) + sum;
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

}  // namespace

// The float32 row, compiled twice on x86-64 (AVX2/FMA and the baseline), chosen once at load by the CPU it runs on:
// the baseline build targets SSE2 only.  Ranks up to 16 take the unrolled form.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
void lowrank_row_f32(const float* xr, const float* Vt, const float* Ut, const float* rr, const float* cr,
                     const float* br, int64_t in, int64_t out, int64_t k, float* zr, float* zout, float* yr) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (k > 0 && k % 8 == 0 && k <= 32 && cpu_has_avx2_fma()) {
    switch (k / 8) {
      case 1: return lowrank_row_f32_avx2<1>(xr, Vt, Ut, rr, cr, br, in, out, zout, yr);
      case 2: return lowrank_row_f32_avx2<2>(xr, Vt, Ut, rr, cr, br, in, out, zout, yr);
      case 3: return lowrank_row_f32_avx2<3>(xr, Vt, Ut, rr, cr, br, in, out, zout, yr);
      default: return lowrank_row_f32_avx2<4>(xr, Vt, Ut, rr, cr, br, in, out, zout, yr);
    }
  }
#endif
  switch (k) {
#define HALRP_FIXED_RANK(K) \
  case K:                   \
    return lowrank_row_fixed<float, K>(xr, Vt, Ut, rr, cr, br, in, out, zout, yr);
    HALRP_FIXED_RANK(1) HALRP_FIXED_RANK(2) HALRP_FIXED_RANK(3) HALRP_FIXED_RANK(4) HALRP_FIXED_RANK(5)
    HALRP_FIXED_RANK(6) HALRP_FIXED_RANK(7) HALRP_FIXED_RANK(8) HALRP_FIXED_RANK(9) HALRP_FIXED_RANK(10)
    HALRP_FIXED_RANK(11) HALRP_FIXED_RANK(12) HALRP_FIXED_RANK(13) HALRP_FIXED_RANK(14) HALRP_FIXED_RANK(15)
    HALRP_FIXED_RANK(16)
#undef HALRP_FIXED_RANK
    default:
      lowrank_row<float>(xr, Vt, Ut, rr, cr, br, in, out, k, zr, zout, yr);
  }
}


namespace {

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// Four outputs at a time: four independent accumulators hide the FMA latency, and the eight-wide slice of xs is
// loaded once for the four rows of W.
__attribute__((target("avx2,fma"))) void base_row_f32_avx2(const float* W, const float* xs, int64_t in, int64_t lo,
                                                            int64_t hi, float* c) {
  const int64_t body = in - in % 8;
  int64_t o = lo;
  for (; o + 4 <= hi; o += 4) {
    const float* w0 = W + o * in;
    const float* w1 = w0 + in;
    const float* w2 = w1 + in;
    const float* w3 = w2 + in;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < body; i += 8) {
      const __m256 xv = _mm256_loadu_ps(xs + i);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (int64_t i = body; i < in; ++i) {
      s0 += w0[i] * xs[i];
      s1 += w1[i] * xs[i];
      s2 += w2[i] * xs[i];
      s3 += w3[i] * xs[i];
    }
    c[o] = s0, c[o + 1] = s1, c[o + 2] = s2, c[o + 3] = s3;
  }
  for (; o < hi; ++o) {
    const float* w = W + o * in;
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i < body; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(xs + i), a);
    float sum = hsum(a);
    for (int64_t i = body; i < in; ++i) sum += w[i] * xs[i];
    c[o] = sum;
  }
}
#endif

}  // namespace

void base_row_f32(const float* W, const float* xs, int64_t in, int64_t lo, int64_t hi, float* c) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2_fma()) return base_row_f32_avx2(W, xs, in, lo, hi, c);
#endif
  for (int64_t o = lo; o < hi; ++o) {
    const float* w = W + o * in;
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < in; ++i) sum += w[i] * xs[i];
    c[o] = sum;
  }
}

}  // namespace halrp
