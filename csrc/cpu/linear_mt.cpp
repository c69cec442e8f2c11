// _halrp_C::linear_mt_cpu, the kernel of halrp::perturbed_linear_mt for the "cpp" provider: rows of a batch through
// the layer of their own task (arguments validated by halrp_fast.ops).
//
//   y[m] = R[t] ⊙ ((S[t] ⊙ x[m]) Wᵀ) + (x[m] V[t]) U[t]ᵀ + B[t],   t = task_ids[m]
//
// One GEMM over W serves the whole batch in the caller's row order (S[t] ⊙ x first, R[t] and B[t] in the
// epilogue).  The low-rank term needs the rows of each task together only where it runs as two small GEMMs
// on a task's block (tasks with many rows); tasks with few rows get it row by row inside the epilogue pass.
// So no full-batch permutation is made: large blocks gather their rows (unless the ids are sorted) and add
// their result back.

#include "../halrp.h"
#include "parallel.h"
#include "rows.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace halrp {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct TaskBlock {
  int64_t task, begin, size;  // entries [begin, begin + size) of RowGroups::rows
};

// The rows of each distinct task: `rows` lists the row indices task by task (ascending within a task), and
// `blocks` says where each task's run of `rows` starts.  `contiguous` when the ids are sorted (rows[p] == p).
struct RowGroups {
  std::vector<int64_t> tid;   // task of each row, in the caller's order
  std::vector<int64_t> rows;  // row indices grouped by task
  std::vector<TaskBlock> blocks;
  bool contiguous = true;
};

RowGroups group_rows(const int64_t* ids, int64_t batch, int64_t rows_per_item) {
  const int64_t n = batch * rows_per_item;
  RowGroups g;
  g.tid.resize(n);
  for (int64_t p = 0; p < n; ++p) g.tid[p] = ids[p / rows_per_item];
  g.contiguous = std::is_sorted(ids, ids + batch);
  g.rows.resize(n);
  std::iota(g.rows.begin(), g.rows.end(), 0);
  if (!g.contiguous)
    std::stable_sort(g.rows.begin(), g.rows.end(), [&](int64_t a, int64_t b) { return g.tid[a] < g.tid[b]; });
  for (int64_t p = 0; p < n; ++p) {
    const int64_t t = g.tid[g.rows[p]];
    if (g.blocks.empty() || g.blocks.back().task != t) g.blocks.push_back({t, p, 0});
    ++g.blocks.back().size;
  }
  return g;
}

// Row-wise low-rank products beat two BLAS calls on a task block up to about this many multiply-adds
// (size · k · (in + out)); measured with bench/bench_compiled_cpu.py.
constexpr int64_t kRowWiseWork = 32768;

// Every row in the caller's order: y = R[t] ⊙ c + B[t], plus (x V[t]) U[t]ᵀ for the rows whose task block is
// small (`rowwise[t]`), with z = x V[t] stored.  `y` may alias `c`.
template <typename T>
void epilogue_rows(const T* x, const T* c, const int64_t* tid, const std::vector<char>& rowwise, const T* rp,
                   const T* bias, const T* vp, const T* up, int64_t rows, int64_t in, int64_t out, int64_t k, T* z,
                   T* y) {
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(out + k * (in + out), 1)),
                   [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> zr(k);
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t t = tid[p];
      const T* rr = rp + t * out;
      const T* br = bias ? bias + t * out : nullptr;
      const T* cr = c + p * out;
      T* yr = y + p * out;
      if (k == 0 || !rowwise[t]) {  // its own loop: the plain epilogue of the rows of large blocks stays vectorised
        for (int64_t o = 0; o < out; ++o) {
          acc_t v = static_cast<acc_t>(rr[o]) * static_cast<acc_t>(cr[o]);
          if (br) v += static_cast<acc_t>(br[o]);
          yr[o] = static_cast<T>(v);
        }
        continue;
      }
      const T* Vt = vp + t * in * k;
      const T* Ut = up + t * out * k;
      if constexpr (std::is_same_v<T, float>) {
        lowrank_row_f32(x + p * in, Vt, Ut, rr, cr, br, in, out, k, zr.data(), z + p * k, yr);
      } else {
        lowrank_row<T>(x + p * in, Vt, Ut, rr, cr, br, in, out, k, zr.data(), z + p * k, yr);
      }
    }
  });
}

// The low-rank term of one large task block with two GEMMs: zb = x_b V[t], y_b += zb U[t]ᵀ.  Rows are gathered
// into (and added back from) block buffers unless the block is a contiguous run of rows.
template <typename T>
void lowrank_block(const at::Tensor& x, const RowGroups& g, const TaskBlock& b, const at::Tensor& U,
                   const at::Tensor& V, at::Tensor& z, at::Tensor& y) {
  const at::Tensor Vt = V.select(0, b.task), Ut = U.select(0, b.task).t();
  if (g.contiguous) {
    at::Tensor zb = z.narrow(0, b.begin, b.size), yb = y.narrow(0, b.begin, b.size);
    at::cpu::mm_out(zb, x.narrow(0, b.begin, b.size), Vt);
    at::cpu::addmm_out(yb, yb, zb, Ut);
    return;
  }
  const int64_t in = x.size(1), out = y.size(1), k = z.size(1);
  const int64_t* idx = g.rows.data() + b.begin;
  at::Tensor xb = at::empty({b.size, in}, x.options());
  const T* xp = x.const_data_ptr<T>();
  T* xbp = xb.mutable_data_ptr<T>();
  for (int64_t q = 0; q < b.size; ++q) std::copy(xp + idx[q] * in, xp + (idx[q] + 1) * in, xbp + q * in);
  const at::Tensor zb = at::cpu::mm(xb, Vt);
  const at::Tensor eb = at::cpu::mm(zb, Ut);
  const T* zbp = zb.const_data_ptr<T>();
  const T* ebp = eb.const_data_ptr<T>();
  T* zp = z.mutable_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  for (int64_t q = 0; q < b.size; ++q) {
    std::copy(zbp + q * k, zbp + (q + 1) * k, zp + idx[q] * k);
    T* yr = yp + idx[q] * out;
    const T* er = ebp + q * out;
    for (int64_t o = 0; o < out; ++o) yr[o] += er[o];
  }
}

// y = R[t] ⊙ ((S[t] ⊙ x) Wᵀ) + (x V[t]) U[t]ᵀ + B[t] for rows in the caller's order; `c` = (S[t] ⊙ x) Wᵀ and
// `xv` = x V[t] when `save`.
template <typename T>
void linear_mt_kernel(const at::Tensor& x, const RowGroups& g, const at::Tensor& weight, const at::Tensor& R,
                      const at::Tensor& S, const at::Tensor& U, const at::Tensor& V, const T* bias, bool save,
                      at::Tensor& y, at::Tensor& c, at::Tensor& xv) {
  using acc_t = at::opmath_type<T>;
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0), k = U.size(2);
  const int64_t* tid = g.tid.data();
  const T* xp = x.const_data_ptr<T>();
  const T* sp = S.const_data_ptr<T>();

  // xs = S[t] ⊙ x; the row order does not matter to the one GEMM over W that serves the whole batch.
  at::Tensor xs = at::empty({rows, in}, x.options());
  T* xsp = xs.mutable_data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(in, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const T* xr = xp + p * in;
      const T* sr = sp + tid[p] * in;
      T* o = xsp + p * in;
      for (int64_t i = 0; i < in; ++i) o[i] = static_cast<T>(static_cast<acc_t>(xr[i]) * static_cast<acc_t>(sr[i]));
    }
  });
  at::Tensor base = at::cpu::mm(xs, weight.t());
  y = save ? at::empty_like(base) : base;  // without save the product is scaled in place
  at::Tensor z = at::empty({rows, k}, x.options());

  // Tasks with little low-rank work are done row by row inside the epilogue pass; two BLAS calls per block cost
  // more than the arithmetic there.
  const int64_t n_tasks = R.size(0);
  std::vector<char> rowwise(n_tasks, 1);
  std::vector<const TaskBlock*> large;
  for (const TaskBlock& b : g.blocks)
    if (k > 0 && b.size * k * (in + out) > kRowWiseWork) rowwise[b.task] = 0, large.push_back(&b);
  const at::Tensor Uc = U.contiguous(), Vc = V.contiguous();
  epilogue_rows<T>(xp, base.const_data_ptr<T>(), tid, rowwise, R.const_data_ptr<T>(), bias, Vc.const_data_ptr<T>(),
                   Uc.const_data_ptr<T>(), rows, in, out, k, z.mutable_data_ptr<T>(), y.mutable_data_ptr<T>());
  // Blocks write disjoint rows of y and z.
  for_each_block(static_cast<int64_t>(large.size()),
                 [&](int64_t i) { lowrank_block<T>(x, g, *large[i], Uc, Vc, z, y); });
  if (save) c = base, xv = z;
}

Outputs perturbed_linear_mt_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                const at::Tensor& R, const at::Tensor& S, const at::Tensor& U, const at::Tensor& V,
                                const std::optional<at::Tensor>& B, bool save) {
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t batch = x.size(0), k = U.size(2);
  const int64_t rows = batch == 0 ? 0 : x.numel() / in;
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> y_shape(lead), z_shape(lead);
  y_shape.push_back(out);
  z_shape.push_back(k);
  if (rows == 0) {
    at::Tensor y = at::empty(y_shape, x.options());
    if (!save) return {y, x.new_empty({0}), x.new_empty({0})};
    return {y, at::empty(y_shape, x.options()), at::empty(z_shape, x.options())};
  }

  const at::Tensor ids = task_ids.contiguous();
  const RowGroups groups = group_rows(ids.const_data_ptr<int64_t>(), batch, rows / batch);
  const at::Tensor x2 = x.reshape({rows, in}).contiguous();
  const at::Tensor Rc = R.contiguous(), Sc = S.contiguous();
  const std::optional<at::Tensor> Bc = B.has_value() ? std::optional<at::Tensor>(B->contiguous()) : std::nullopt;
  at::Tensor y, c, xv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "perturbed_linear_mt_cpu", [&] {
    linear_mt_kernel<scalar_t>(x2, groups, weight, Rc, Sc, U, V, Bc ? Bc->const_data_ptr<scalar_t>() : nullptr, save,
                               y, c, xv);
  });
  if (!save) return {y.view(y_shape), x.new_empty({0}), x.new_empty({0})};
  return {y.view(y_shape), c.view(y_shape), xv.view(z_shape)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(_halrp_C, m) {
  m.def("linear_mt_cpu(Tensor x, Tensor task_ids, Tensor weight, Tensor R, Tensor S, Tensor U, Tensor V, Tensor? B, "
        "bool save) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(_halrp_C, CPU, m) { m.impl("linear_mt_cpu", TORCH_FN(perturbed_linear_mt_cpu)); }

}  // namespace halrp
