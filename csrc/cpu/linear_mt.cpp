// halrp::perturbed_linear_mt on CPU: rows of a batch through the layer of their own task.
//
//   y[m] = R[t] ⊙ ((S[t] ⊙ x[m]) Wᵀ) + (x[m] V[t]) U[t]ᵀ + B[t],   t = task_ids[m]
//
// Rows are ordered by task (a stable sort; skipped when the ids are already sorted), so every task's rows
// form one contiguous block: one GEMM over W serves the whole batch, and each distinct task costs two small
// GEMMs on its block (x V[t], then (x V[t]) U[t]ᵀ accumulated in place) with no gather of the banks.
// Scaling, bias and the un-permutation are single passes over the rows.
#include "../halrp.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

namespace halrp {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct TaskBlock {
  int64_t task, begin, size;  // rows [begin, begin + size) of the task-ordered batch
};

// Task-ordered row order `perm` (empty when the rows are already ordered) and the blocks of equal task.
struct RowOrder {
  std::vector<int64_t> perm;
  std::vector<int64_t> sorted_ids;  // task of each task-ordered row
  std::vector<TaskBlock> blocks;
};

RowOrder order_rows(const int64_t* ids, int64_t batch, int64_t rows_per_item) {
  const int64_t rows = batch * rows_per_item;
  RowOrder order;
  const bool sorted = std::is_sorted(ids, ids + batch);
  if (!sorted) {
    std::vector<int64_t> items(batch);
    std::iota(items.begin(), items.end(), 0);
    std::stable_sort(items.begin(), items.end(), [ids](int64_t a, int64_t b) { return ids[a] < ids[b]; });
    order.perm.resize(rows);
    for (int64_t i = 0; i < batch; ++i)
      for (int64_t l = 0; l < rows_per_item; ++l) order.perm[i * rows_per_item + l] = items[i] * rows_per_item + l;
  }
  order.sorted_ids.resize(rows);
  for (int64_t p = 0; p < rows; ++p) {
    const int64_t row = sorted ? p : order.perm[p];
    order.sorted_ids[p] = ids[row / rows_per_item];
  }
  for (int64_t p = 0; p < rows; ++p) {
    if (order.blocks.empty() || order.blocks.back().task != order.sorted_ids[p]) {
      order.blocks.push_back({order.sorted_ids[p], p, 0});
    }
    ++order.blocks.back().size;
  }
  return order;
}

// dst[p] = src[perm[p]] (gather) or dst[perm[p]] = src[p] (scatter) for rows of `width` elements.
template <typename T>
void permute_rows(const T* src, T* dst, const std::vector<int64_t>& perm, int64_t width, bool scatter) {
  const int64_t rows = static_cast<int64_t>(perm.size());
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const T* s = src + (scatter ? p : perm[p]) * width;
      T* d = dst + (scatter ? perm[p] : p) * width;
      std::copy(s, s + width, d);
    }
  });
}

// Row-wise low-rank products beat two BLAS calls on a task block up to about this many multiply-adds
// (size · k · (in + out)); measured with bench/bench_compiled_cpu.py.
constexpr int64_t kRowWiseWork = 32768;

// For each task-ordered row p in `selected`: z[p] = x[p] V[t], y[p] += U[t] z[p] (t = tid[p]); fp32+ accumulation.
template <typename T>
void lowrank_rows(const T* x, const int64_t* tid, const std::vector<int64_t>& selected, const at::Tensor& V,
                  const at::Tensor& U, int64_t in, int64_t out, int64_t k, T* z, T* y) {
  using acc_t = at::opmath_type<T>;
  if (selected.empty()) return;
  const at::Tensor Vc = V.contiguous(), Uc = U.contiguous();
  const T* vp = Vc.const_data_ptr<T>();
  const T* up = Uc.const_data_ptr<T>();
  const int64_t n = static_cast<int64_t>(selected.size());
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> zr(k);
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t p = selected[q], t = tid[p];
      const T* xr = x + p * in;
      const T* Vt = vp + t * in * k;
      std::fill(zr.begin(), zr.end(), acc_t(0));
      for (int64_t i = 0; i < in; ++i) {
        const acc_t xi = static_cast<acc_t>(xr[i]);
        const T* vrow = Vt + i * k;
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) zr[j] += xi * static_cast<acc_t>(vrow[j]);
      }
      for (int64_t j = 0; j < k; ++j) z[p * k + j] = static_cast<T>(zr[j]);
      const T* Ut = up + t * out * k;
      T* yr = y + p * out;
      for (int64_t o = 0; o < out; ++o) {
        const T* urow = Ut + o * k;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < k; ++j) sum += static_cast<acc_t>(urow[j]) * zr[j];
        yr[o] = static_cast<T>(static_cast<acc_t>(yr[o]) + sum);
      }
    }
  });
}

template <typename T>
void linear_mt_kernel(const at::Tensor& xo, const RowOrder& order, const at::Tensor& weight, const at::Tensor& R,
                      const at::Tensor& S, const at::Tensor& U, const at::Tensor& V, const T* bias, bool save,
                      at::Tensor& y, at::Tensor& c, at::Tensor& xv) {
  using acc_t = at::opmath_type<T>;
  const int64_t rows = xo.size(0), in = xo.size(1), out = weight.size(0), k = U.size(2);
  const int64_t* tid = order.sorted_ids.data();
  const T* xp = xo.const_data_ptr<T>();
  const T* sp = S.const_data_ptr<T>();
  const T* rp = R.const_data_ptr<T>();

  // xs = S[t] ⊙ x  (task-ordered rows)
  at::Tensor xs = at::empty({rows, in}, xo.options());
  T* xsp = xs.mutable_data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(in, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const T* xr = xp + p * in;
      const T* sr = sp + tid[p] * in;
      T* o = xsp + p * in;
      for (int64_t i = 0; i < in; ++i) o[i] = static_cast<T>(static_cast<acc_t>(xr[i]) * static_cast<acc_t>(sr[i]));
    }
  });
  // c = xs Wᵀ: one pass over W for the whole batch.
  at::Tensor base = at::cpu::mm(xs, weight.t());
  // y = R[t] ⊙ c + B[t]; without save the product is scaled in place.
  at::Tensor yo = save ? at::empty_like(base) : base;
  const T* cp = base.const_data_ptr<T>();
  T* yp = yo.mutable_data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(out, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const T* rr = rp + tid[p] * out;
      const T* br = bias ? bias + tid[p] * out : nullptr;
      const T* cr = cp + p * out;
      T* o = yp + p * out;
      if (br) {
        for (int64_t j = 0; j < out; ++j)
          o[j] = static_cast<T>(static_cast<acc_t>(rr[j]) * static_cast<acc_t>(cr[j]) + static_cast<acc_t>(br[j]));
      } else {
        for (int64_t j = 0; j < out; ++j) o[j] = static_cast<T>(static_cast<acc_t>(rr[j]) * static_cast<acc_t>(cr[j]));
      }
    }
  });
  // Low-rank term, one block of rows per distinct task: z = x V[t], y += z U[t]ᵀ.  Blocks with little work run as
  // row-wise products (in parallel over those rows): two BLAS calls per block cost more than the arithmetic there.
  at::Tensor z = at::empty({rows, k}, xo.options());
  if (k > 0) {
    auto small = [&](const TaskBlock& b) { return b.size * k * (in + out) <= kRowWiseWork; };
    std::vector<int64_t> small_rows;
    for (const TaskBlock& b : order.blocks)
      if (small(b))
        for (int64_t p = b.begin; p < b.begin + b.size; ++p) small_rows.push_back(p);
    lowrank_rows<T>(xp, tid, small_rows, V, U, in, out, k, z.mutable_data_ptr<T>(), yp);
    std::vector<const TaskBlock*> large;
    for (const TaskBlock& b : order.blocks)
      if (!small(b)) large.push_back(&b);
    auto block_products = [&](const TaskBlock& b) {
      at::Tensor zb = z.narrow(0, b.begin, b.size);
      at::cpu::mm_out(zb, xo.narrow(0, b.begin, b.size), V.select(0, b.task));
      at::Tensor yb = yo.narrow(0, b.begin, b.size);
      at::cpu::addmm_out(yb, yb, zb, U.select(0, b.task).t());
    };
    // With at least as many blocks as threads, the blocks run in parallel (each BLAS call on one thread): a
    // threaded BLAS call on a block this small spends more on starting its threads than on the products.
    if (static_cast<int64_t>(large.size()) >= at::get_num_threads()) {
      at::parallel_for(0, static_cast<int64_t>(large.size()), 1, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) block_products(*large[i]);
      });
    } else {
      for (const TaskBlock* b : large) block_products(*b);
    }
  }
  // Back to the caller's row order.
  if (order.perm.empty()) {
    y = yo;
    if (save) c = base, xv = z;
    return;
  }
  y = at::empty_like(yo);
  permute_rows(yo.const_data_ptr<T>(), y.mutable_data_ptr<T>(), order.perm, out, /*scatter=*/true);
  if (save) {
    c = at::empty_like(base);
    permute_rows(base.const_data_ptr<T>(), c.mutable_data_ptr<T>(), order.perm, out, true);
    xv = at::empty_like(z);
    if (k > 0) permute_rows(z.const_data_ptr<T>(), xv.mutable_data_ptr<T>(), order.perm, k, true);
  }
}

Outputs perturbed_linear_mt_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                const at::Tensor& R, const at::Tensor& S, const at::Tensor& U, const at::Tensor& V,
                                const std::optional<at::Tensor>& B, bool save) {
  HALRP_CHECK_TYPE(x.is_floating_point(), "x must be a floating-point tensor, got ", describe(x));
  HALRP_CHECK_VALUE(x.dim() >= 2, "x must have shape (M, ..., in), got ", describe(x));
  check_like("weight", weight, x);
  HALRP_CHECK_VALUE(weight.dim() == 2, "weight must have shape (out, in), got ", describe(weight));
  const int64_t out = weight.size(0), in = weight.size(1);
  HALRP_CHECK_VALUE(x.size(-1) == in, "x must have shape (M, ..., in=", in, ") to match weight ", weight.sizes(),
                    ", got ", describe(x));
  const int64_t T = check_banks(x, R, S, U, V, B, out, in);
  check_task_ids(task_ids, x.size(0), T, x);

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
  const RowOrder order = order_rows(ids.const_data_ptr<int64_t>(), batch, rows / batch);
  const at::Tensor x2 = x.reshape({rows, in}).contiguous();
  const at::Tensor Rc = R.contiguous(), Sc = S.contiguous();
  const std::optional<at::Tensor> Bc = B.has_value() ? std::optional<at::Tensor>(B->contiguous()) : std::nullopt;
  at::Tensor y, c, xv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "perturbed_linear_mt_cpu", [&] {
    at::Tensor xo = x2;
    if (!order.perm.empty()) {
      xo = at::empty_like(x2);
      permute_rows(x2.const_data_ptr<scalar_t>(), xo.mutable_data_ptr<scalar_t>(), order.perm, in, false);
    }
    linear_mt_kernel<scalar_t>(xo, order, weight, Rc, Sc, U, V, Bc ? Bc->const_data_ptr<scalar_t>() : nullptr, save, y,
                               c, xv);
  });
  if (!save) return {y.view(y_shape), x.new_empty({0}), x.new_empty({0})};
  return {y.view(y_shape), c.view(y_shape), xv.view(z_shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(halrp, CPU, m) {
  register_routed(m, "perturbed_linear_mt", c10::KernelFunction::makeFromUnboxedFunction(TORCH_FN(perturbed_linear_mt_cpu)),
                  c10::DeviceType::CPU);
}

}  // namespace halrp
