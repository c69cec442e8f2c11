// _halrp_C::fit_scalings_cpu, the kernel of halrp::fit_scalings for the "cpp" provider: the least-squares fit
// W_free ≈ diag(r) W diag(s) in one pass over the weights (arguments validated by halrp_fast.ops).
//
//   r_j = Σ_i P_ji / max(Σ_i Q_ji, ε),   s_i = Σ_j r_j P_ji / max(Σ_j r_j² Q_ji, ε)
//
// with P = W ⊙ W_free and Q = W ⊙ W summed over the kernel positions of a conv weight.  Row j's r_j is known as
// soon as its row has been read, so its contributions to the column sums of s are added while the row is still
// in cache: each weight element is read once, and no (out, in) temporary is materialised.  Threads own blocks of
// rows and keep their own column sums, reduced at the end.
#include "../halrp.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace halrp {
namespace {

constexpr double kEps = 1e-20;

// P_i = Σ_taps W ⊙ W_free and Q_i = Σ_taps W ⊙ W of one row into prow, qrow; their totals into psum, qsum.
template <typename T, typename acc_t>
void row_products(const T* w, const T* f, int64_t in, int64_t taps, acc_t* prow, acc_t* qrow, acc_t& psum,
                  acc_t& qsum) {
  acc_t ps = 0, qs = 0;
  if (taps == 1) {
#pragma omp simd reduction(+ : ps, qs)
    for (int64_t i = 0; i < in; ++i) {
      const acc_t wv = static_cast<acc_t>(w[i]);
      prow[i] = wv * static_cast<acc_t>(f[i]);
      qrow[i] = wv * wv;
      ps += prow[i];
      qs += qrow[i];
    }
  } else {
    for (int64_t i = 0; i < in; ++i) {
      acc_t p = 0, q = 0;
      for (int64_t t = 0; t < taps; ++t) {
        const acc_t wv = static_cast<acc_t>(w[i * taps + t]);
        p += wv * static_cast<acc_t>(f[i * taps + t]);
        q += wv * wv;
      }
      prow[i] = p;
      qrow[i] = q;
      ps += p;
      qs += q;
    }
  }
  psum = ps;
  qsum = qs;
}

// Column sums of s: num += r_j P_j·, den += r_j² Q_j·.
template <typename acc_t>
void accumulate_columns(acc_t rj, const acc_t* prow, const acc_t* qrow, int64_t in, acc_t* num, acc_t* den) {
  const acc_t rj2 = rj * rj;
#pragma omp simd
  for (int64_t i = 0; i < in; ++i) {
    num[i] += rj * prow[i];
    den[i] += rj2 * qrow[i];
  }
}

std::tuple<at::Tensor, at::Tensor> fit_scalings_cpu(const at::Tensor& W_free, const at::Tensor& W) {
  const int64_t out = W.size(0), in = W.size(1), taps = W.dim() == 4 ? W.size(2) * W.size(3) : 1;
  const at::Tensor Wc = W.contiguous(), Fc = W_free.contiguous();
  at::Tensor r = at::empty({out}, W.options()), s = at::empty({in}, W.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "fit_scalings_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* wp = Wc.const_data_ptr<scalar_t>();
    const scalar_t* fp = Fc.const_data_ptr<scalar_t>();
    scalar_t* rp = r.mutable_data_ptr<scalar_t>();
    const int64_t threads = at::get_num_threads();
    // Per thread: column sums Σ_j r_j P_ji (first `in`) and Σ_j r_j² Q_ji (next `in`).
    std::vector<acc_t> partial(static_cast<size_t>(threads) * 2 * in, acc_t(0));
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(in * taps, 1));
    at::parallel_for(0, out, grain, [&](int64_t lo, int64_t hi) {
      acc_t* num = partial.data() + at::get_thread_num() * 2 * in;
      acc_t* den = num + in;
      std::vector<acc_t> prow(in), qrow(in);
      for (int64_t j = lo; j < hi; ++j) {
        acc_t psum = 0, qsum = 0;
        row_products(wp + j * in * taps, fp + j * in * taps, in, taps, prow.data(), qrow.data(), psum, qsum);
        const acc_t rj = psum / std::max(qsum, static_cast<acc_t>(kEps));
        rp[j] = static_cast<scalar_t>(rj);
        accumulate_columns(rj, prow.data(), qrow.data(), in, num, den);
      }
    });
    scalar_t* sp = s.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < in; ++i) {
      acc_t n = 0, d = 0;
      for (int64_t th = 0; th < threads; ++th) {
        n += partial[th * 2 * in + i];
        d += partial[th * 2 * in + in + i];
      }
      sp[i] = static_cast<scalar_t>(n / std::max(d, static_cast<acc_t>(kEps)));
    }
  });
  return {r, s};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(_halrp_C, m) { m.def("fit_scalings_cpu(Tensor W_free, Tensor W) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(_halrp_C, CPU, m) { m.impl("fit_scalings_cpu", TORCH_FN(fit_scalings_cpu)); }

}  // namespace halrp
