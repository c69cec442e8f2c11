// _halrp_C::conv2d_mt_cpu, the kernel of halrp::perturbed_conv2d_mt for the "cpp" provider: images of a batch
// through the conv layer of their own task (arguments validated by halrp_fast.ops).
//
//   y[n] = R[t] ⊙ conv(S[t] ⊙ x[n], W) + U[t] · Σ_window(V[t]ᵀ · x[n]) + B[t],   t = task_ids[n]
//
// The base conv runs once for the whole batch (oneDNN through at::conv2d) on the input scaled in one pass.
// The extras are fused per image, in parallel over images: the channel mix by V[t]ᵀ and the window sum (on
// whichever side has fewer channels, as they commute), the 1×1 expand by U[t] accumulated in place into the
// output already holding R[t] ⊙ c + B[t].  No bank is gathered and no per-task Python loop runs.  When every
// image has the same task, the extras run batched instead (1×1 convs and a sum-pool over the whole batch), which
// measures faster than per-image products there.  Inference on channels-last tensors (the CPU default for conv
// networks) takes `conv_mt_nhwc`: the same math on (images·pixels, channels) row blocks, no layout conversion.
#include "../halrp.h"
#include "parallel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

namespace halrp {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct Geometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// First output column ow whose tap `j` lands inside [0, W): ow·stride − pad + j·dil ≥ 0; and one past the last.
inline std::pair<int64_t, int64_t> valid_outputs(int64_t j, int64_t W, int64_t Wo, int64_t stride, int64_t pad,
                                                 int64_t dil) {
  const int64_t shift = j * dil - pad;  // input column of output 0
  const int64_t lo = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
  const int64_t hi = shift >= W ? 0 : std::min<int64_t>(Wo, (W - 1 - shift) / stride + 1);
  return {lo, std::max(lo, hi)};
}

// out (C, Ho, Wo) = sum of in (C, H, W) over every conv window of `g`, separably: a horizontal pass of kw taps
// into (H, Wo) then a vertical pass of kh taps, so kh + kw adds per output instead of kh · kw, with the bounds
// hoisted out of the inner loops (contiguous, vectorisable runs at stride 1).
template <typename T>
void window_sum(const T* in, T* out, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo, const Geometry& g) {
  using acc_t = at::opmath_type<T>;
  std::vector<acc_t> rows(H * Wo), acc(Wo);
  for (int64_t ch = 0; ch < C; ++ch) {
    const T* plane = in + ch * H * W;
    std::fill(rows.begin(), rows.end(), acc_t(0));
    for (int64_t j = 0; j < g.kw; ++j) {
      const auto [lo, hi] = valid_outputs(j, W, Wo, g.sw, g.pw, g.dw);
      const int64_t shift = j * g.dw - g.pw;
      for (int64_t h = 0; h < H; ++h) {
        const T* line = plane + h * W + shift;
        acc_t* r = rows.data() + h * Wo;
        for (int64_t ow = lo; ow < hi; ++ow) r[ow] += static_cast<acc_t>(line[ow * g.sw]);
      }
    }
    T* o = out + ch * Ho * Wo;
    for (int64_t oh = 0; oh < Ho; ++oh) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t h = oh * g.sh - g.ph + i * g.dh;
        if (h < 0 || h >= H) continue;
        const acc_t* r = rows.data() + h * Wo;
        for (int64_t ow = 0; ow < Wo; ++ow) acc[ow] += r[ow];
      }
      for (int64_t ow = 0; ow < Wo; ++ow) o[oh * Wo + ow] = static_cast<T>(acc[ow]);
    }
  }
}

// Channels-last (NHWC) window sum of one image: out (Ho, Wo, C) = Σ over each conv window of in (H, W, C), as
// `window_sum` separably (a pass along W into rows (H, Wo, C), then along H).  At stride 1 the pixels a tap
// reaches are contiguous in memory, so each pass is a run of (pixels · C) adds.
template <typename T>
void window_sum_nhwc(const T* in, T* out, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                     const Geometry& g, std::vector<at::opmath_type<T>>& rows) {
  using acc_t = at::opmath_type<T>;
  rows.assign(H * Wo * C, acc_t(0));
  for (int64_t j = 0; j < g.kw; ++j) {
    const auto [lo, hi] = valid_outputs(j, W, Wo, g.sw, g.pw, g.dw);
    const int64_t shift = j * g.dw - g.pw;
    for (int64_t h = 0; h < H; ++h) {
      acc_t* dst = rows.data() + (h * Wo + lo) * C;
      const T* src = in + (h * W + lo * g.sw + shift) * C;
      if (g.sw == 1) {
        const int64_t n = (hi - lo) * C;
#pragma omp simd
        for (int64_t e = 0; e < n; ++e) dst[e] += static_cast<acc_t>(src[e]);
      } else {
        for (int64_t ow = lo; ow < hi; ++ow, dst += C, src += g.sw * C)
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dst[c] += static_cast<acc_t>(src[c]);
      }
    }
  }
  const int64_t row = Wo * C;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    T* o = out + oh * row;
    bool first = true;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t h = oh * g.sh - g.ph + i * g.dh;
      if (h < 0 || h >= H) continue;
      const acc_t* r = rows.data() + h * row;
      if (first) {
#pragma omp simd
        for (int64_t e = 0; e < row; ++e) o[e] = static_cast<T>(r[e]);
      } else {
#pragma omp simd
        for (int64_t e = 0; e < row; ++e) o[e] = static_cast<T>(static_cast<acc_t>(o[e]) + r[e]);
      }
      first = false;
    }
    if (first) std::fill(o, o + row, T(0));
  }
}

// Inference on channels-last x and weight: the base conv once for the batch on S[t] ⊙ x, then per run of
// consecutive images of one task (the rows a TaskModel sorted by task form one run per task), all of it on
// (images·pixels, channels) row blocks: the low-rank term is Σ_window(x) (V Uᵀ) when C_in ≤ k (sum the few
// input channels, then one C_in → C_out product) and else Σ_window(x V) Uᵀ, added to R[t] ⊙ c + B[t].
// Returns y (N, C_out, Ho, Wo) channels-last.
template <typename T>
at::Tensor conv_mt_nhwc(const at::Tensor& x, const int64_t* tid, const at::Tensor& weight, const at::Tensor& R,
                        const at::Tensor& S, const at::Tensor& U, const at::Tensor& V, const T* bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, const Geometry& g,
                        int64_t Ho, int64_t Wo) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = weight.size(0), k = U.size(2);
  const int64_t HW = H * W, HWo = Ho * Wo;
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const T* xp = xc.const_data_ptr<T>();
  const T* sp = S.const_data_ptr<T>();
  at::Tensor xs = at::empty_like(xc, at::MemoryFormat::ChannelsLast);
  T* xsp = xs.mutable_data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const T* sr = sp + tid[n] * C;
      for (int64_t p = n * HW; p < (n + 1) * HW; ++p) {
        const T* xr = xp + p * C;
        T* o = xsp + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(static_cast<acc_t>(xr[c]) * static_cast<acc_t>(sr[c]));
      }
    }
  });
  at::Tensor y = at::conv2d(xs, weight, {}, stride, padding, dilation).contiguous(at::MemoryFormat::ChannelsLast);
  xs = at::Tensor();
  // Runs of consecutive images with one task.
  std::vector<std::pair<int64_t, int64_t>> runs;  // (first image, count)
  for (int64_t n = 0; n < N; ++n) {
    if (runs.empty() || tid[runs.back().first] != tid[n]) runs.emplace_back(n, 0);
    ++runs.back().second;
  }
  const bool sum_first = C <= k;
  const int64_t mid = k == 0 ? 0 : sum_first ? C : k;  // channels of the window-summed term
  // Per task of a run, M (mid × C_out): V[t] U[t]ᵀ (sum first) or U[t]ᵀ.
  std::vector<at::Tensor> M(runs.size());
  for (size_t i = 0; i < runs.size() && mid > 0; ++i) {
    const int64_t t = tid[runs[i].first];
    M[i] = sum_first ? at::cpu::mm(V.select(0, t), U.select(0, t).t()) : U.select(0, t).t().contiguous();
  }
  at::Tensor pooled = at::empty({N * HWo, mid}, x.options());
  T* pp = pooled.mutable_data_ptr<T>();
  if (mid > 0) {
    at::Tensor mixed;  // x V[t] per pixel when the channel mix comes first
    if (!sum_first) {
      mixed = at::empty({N * HW, k}, x.options());
      const at::Tensor x2 = xc.as_strided({N * HW, C}, {C, 1});  // the NHWC memory as rows of pixels
      for_each_block(static_cast<int64_t>(runs.size()), [&](int64_t i) {
        const auto [first, count] = runs[i];
        at::Tensor out = mixed.narrow(0, first * HW, count * HW);
        at::cpu::mm_out(out, x2.narrow(0, first * HW, count * HW), V.select(0, tid[first]));
      });
    }
    const T* src = sum_first ? xp : mixed.const_data_ptr<T>();
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> rows;
      for (int64_t n = lo; n < hi; ++n)
        window_sum_nhwc(src + n * HW * mid, pp + n * HWo * mid, mid, H, W, Ho, Wo, g, rows);
    });
  }
  // y = R[t] ⊙ c + B[t], in parallel over images; then y += pooled · M, one product per run.
  T* yp = y.mutable_data_ptr<T>();
  const T* rp = R.const_data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const T* rr = rp + tid[n] * Co;
      const T* br = bias ? bias + tid[n] * Co : nullptr;
      for (int64_t p = n * HWo; p < (n + 1) * HWo; ++p) {
        T* o = yp + p * Co;
        if (br) {
#pragma omp simd
          for (int64_t c = 0; c < Co; ++c)
            o[c] = static_cast<T>(static_cast<acc_t>(rr[c]) * static_cast<acc_t>(o[c]) + static_cast<acc_t>(br[c]));
        } else {
#pragma omp simd
          for (int64_t c = 0; c < Co; ++c) o[c] = static_cast<T>(static_cast<acc_t>(rr[c]) * static_cast<acc_t>(o[c]));
        }
      }
    }
  });
  if (mid > 0) {
    const at::Tensor y2 = y.as_strided({N * HWo, Co}, {Co, 1});  // a view of y's memory
    for_each_block(static_cast<int64_t>(runs.size()), [&](int64_t i) {
      const auto [first, count] = runs[i];
      at::Tensor yb = y2.narrow(0, first * HWo, count * HWo);
      at::cpu::addmm_out(yb, yb, pooled.narrow(0, first * HWo, count * HWo), M[i]);
    });
  }
  return y;
}

Outputs perturbed_conv2d_mt_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                const at::Tensor& R, const at::Tensor& S, const at::Tensor& U, const at::Tensor& V,
                                const std::optional<at::Tensor>& B, bool save, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g{weight.size(2), weight.size(3), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = weight.size(0);
  const int64_t Ho = (H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  const int64_t Wo = (W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  const int64_t k = U.size(2);

  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor Rc = R.contiguous(), Sc = S.contiguous();
  const std::optional<at::Tensor> Bc = B.has_value() ? std::optional<at::Tensor>(B->contiguous()) : std::nullopt;
  at::Tensor y, base, pooled;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "perturbed_conv2d_mt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* tid = ids.const_data_ptr<int64_t>();
    const int64_t HW = H * W, HWo = Ho * Wo;
    if (!save && conv_layout(x, weight) == at::MemoryFormat::ChannelsLast) {
      y = conv_mt_nhwc<scalar_t>(x, tid, weight, Rc, Sc, U, V, Bc ? Bc->const_data_ptr<scalar_t>() : nullptr, stride,
                                 padding, dilation, g, Ho, Wo);
      return;
    }
    const at::Tensor xc = x.contiguous();
    const bool mix_first = k <= C;  // channel mix before the window sum when it leaves fewer channels to sum
    const bool one_task = N > 0 && std::all_of(tid, tid + N, [&](int64_t t) { return t == tid[0]; });
    const bool sum_pool = g.dh == 1 && g.dw == 1 && 2 * g.ph <= g.kh && 2 * g.pw <= g.kw;
    if (one_task && sum_pool && mix_first && k > 0) {
      // One task: broadcast scales and batched 1×1 convs with a sum-pool over the whole batch.
      const int64_t t = tid[0];
      base = at::conv2d(xc.mul(Sc.select(0, t).view({1, C, 1, 1})), weight, {}, stride, padding, dilation);
      const at::Tensor r = Rc.select(0, t).view({1, Co, 1, 1});
      y = save ? base.mul(r) : base.mul_(r);
      if (Bc) y.add_(Bc->select(0, t).view({1, Co, 1, 1}));
      const at::Tensor mixed = at::conv2d(xc, V.select(0, t).t().reshape({k, C, 1, 1}));
      pooled = at::avg_pool2d(mixed, {g.kh, g.kw}, {g.sh, g.sw}, {g.ph, g.pw}, false, true, 1);
      y.add_(at::conv2d(pooled, U.select(0, t).reshape({Co, k, 1, 1})));
      return;
    }
    // xs = S[t] ⊙ x, one pass over the (image, channel) planes.
    at::Tensor xs = at::empty_like(xc);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* sp = Sc.const_data_ptr<scalar_t>();
    scalar_t* xsp = xs.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t plane = lo; plane < hi; ++plane) {
        const acc_t scale = static_cast<acc_t>(sp[tid[plane / C] * C + plane % C]);
        for (int64_t i = 0; i < HW; ++i)
          xsp[plane * HW + i] = static_cast<scalar_t>(scale * static_cast<acc_t>(xp[plane * HW + i]));
      }
    });
    base = at::conv2d(xs, weight, {}, stride, padding, dilation).contiguous();
    y = save ? at::empty_like(base) : base;
    pooled = at::empty({N, k, Ho, Wo}, x.options());
    const scalar_t* rp = Rc.const_data_ptr<scalar_t>();
    const scalar_t* bp = Bc ? Bc->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* cp = base.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t t = tid[n];
        // y[n] = R[t] ⊙ c[n] + B[t]
        for (int64_t o = 0; o < Co; ++o) {
          const acc_t r = static_cast<acc_t>(rp[t * Co + o]);
          const acc_t b = bp ? static_cast<acc_t>(bp[t * Co + o]) : acc_t(0);
          const scalar_t* cr = cp + (n * Co + o) * HWo;
          scalar_t* yr = yp + (n * Co + o) * HWo;
          for (int64_t i = 0; i < HWo; ++i) yr[i] = static_cast<scalar_t>(r * static_cast<acc_t>(cr[i]) + b);
        }
        if (k == 0) continue;
        const at::Tensor xn = xc.select(0, n).view({C, HW});
        const at::Tensor Vt = V.select(0, t);  // (C, k)
        at::Tensor pn = pooled.select(0, n).view({k, HWo});
        if (mix_first) {
          const at::Tensor mixed = at::cpu::mm(Vt.t(), xn);  // (k, H·W)
          window_sum(mixed.const_data_ptr<scalar_t>(), pn.mutable_data_ptr<scalar_t>(), k, H, W, Ho, Wo, g);
        } else {
          at::Tensor summed = at::empty({C, HWo}, x.options());
          window_sum(xn.const_data_ptr<scalar_t>(), summed.mutable_data_ptr<scalar_t>(), C, H, W, Ho, Wo, g);
          at::cpu::mm_out(pn, Vt.t(), summed);
        }
        at::Tensor yn = y.select(0, n).view({Co, HWo});
        at::cpu::addmm_out(yn, yn, U.select(0, t), pn);  // += U[t] · pooled
      }
    });
  });
  // Outputs in the layout F.conv2d would give them (and the op's fake kernel states).
  const at::MemoryFormat layout = conv_layout(x, weight);
  if (!save) return {y.contiguous(layout), x.new_empty({0}), x.new_empty({0})};
  return {y.contiguous(layout), base.contiguous(layout), pooled.contiguous(layout)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(_halrp_C, m) {
  m.def("conv2d_mt_cpu(Tensor x, Tensor task_ids, Tensor weight, Tensor R, Tensor S, Tensor U, Tensor V, Tensor? B, "
        "bool save, int[] stride, int[] padding, int[] dilation) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(_halrp_C, CPU, m) { m.impl("conv2d_mt_cpu", TORCH_FN(perturbed_conv2d_mt_cpu)); }

}  // namespace halrp
