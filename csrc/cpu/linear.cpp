// _halrp_C::linear_cpu and _halrp_C::linear_backward_cpu, the kernels of halrp::perturbed_linear and its backward
// for the "cpp" provider (arguments validated by halrp_fast.ops):
//
//   y = r ⊙ ((s ⊙ x) Wᵀ) + (x V) Uᵀ + b
//
// The same ATen products, in the same order, as the reference provider (halrp_fast/reference.py): at serving sizes
// the arithmetic is a few microseconds and the cost is the calls around it, which here are C++ calls.  One dense
// float32 row (serving one request) goes through the row kernels of rows.h instead: one pass, no ATen products.
#include "../halrp.h"
#include "rows.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>

#include <torch/csrc/autograd/custom_function.h>

#include <tuple>
#include <vector>

namespace halrp {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The leading dimensions of x followed by `last`.
std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(last);
  return shape;
}

// Whether one row takes the fused row kernels: float32, every operand dense (W, U, V row-major).
bool one_fused_row(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& r, const at::Tensor& s,
                   const at::Tensor& U, const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  return x2.size(0) == 1 && x2.scalar_type() == at::kFloat && x2.stride(1) == 1 && weight.is_contiguous() &&
         r.is_contiguous() && s.is_contiguous() && U.is_contiguous() && V.is_contiguous() &&
         (!bias.has_value() || bias->is_contiguous());
}

// One row: c = W (s ⊙ x) by the row kernel (outputs split over threads for large layers), then z = Vᵀ x and
// y = r ⊙ c + b + U z in one pass over the outputs; at serving sizes the five ATen calls of the general path cost
// more than the arithmetic.  Returns (y, c, z) as (1, out), (1, out), (1, k); c is y's storage unless `save`.
Outputs linear_row_cpu(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& r, const at::Tensor& s,
                       const at::Tensor& U, const at::Tensor& V, const std::optional<at::Tensor>& bias, bool save) {
  const int64_t out = weight.size(0), in = weight.size(1), k = U.size(1);
  const float* x = x2.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  std::vector<float> xs(in);
  for (int64_t i = 0; i < in; ++i) xs[i] = sp[i] * x[i];
  at::Tensor y = at::empty({1, out}, x2.options());
  at::Tensor c = save ? at::empty({1, out}, x2.options()) : y;
  const float* W = weight.data_ptr<float>();
  float* cp = c.data_ptr<float>();
  at::parallel_for(0, out, std::max<int64_t>(1, 65536 / std::max<int64_t>(in, 1)),
                   [&](int64_t lo, int64_t hi) { base_row_f32(W, xs.data(), in, lo, hi, cp); });
  at::Tensor z = at::empty({1, k}, x2.options());
  std::vector<float> zr(k);  // rank 0: the epilogue alone, y = r ⊙ c + b
  lowrank_row_f32(x, V.data_ptr<float>(), U.data_ptr<float>(), r.data_ptr<float>(), cp,
                  bias.has_value() ? bias->data_ptr<float>() : nullptr, in, out, k, zr.data(), z.data_ptr<float>(),
                  y.data_ptr<float>());
  return {y, c, z};
}

Outputs linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r, const at::Tensor& s,
                   const at::Tensor& U, const at::Tensor& V, const std::optional<at::Tensor>& bias, bool save) {
  const int64_t out = weight.size(0), in = weight.size(1), k = U.size(1);
  const bool flat = x.dim() != 2;
  const at::Tensor x2 = flat ? x.reshape({-1, in}) : x;
  if (one_fused_row(x2, weight, r, s, U, V, bias)) {
    auto [y, c, z] = linear_row_cpu(x2, weight, r, s, U, V, bias, save);
    if (!save) {
      const at::Tensor empty = x.new_empty({0});
      return {y.view(with_last(x, out)), empty, empty};
    }
    return {y.view(with_last(x, out)), c.view(with_last(x, out)), z.view(with_last(x, k))};
  }
  at::Tensor c = at::linear(at::mul(x2, s), weight);
  at::Tensor y = bias.has_value() ? at::addcmul(*bias, c, r) : (save ? at::mul(c, r) : c.mul_(r));
  at::Tensor xv;
  if (k > 0 || save) xv = at::mm(x2, V);
  if (k > 0) y.addmm_(xv, U.t());
  if (!save) {
    const at::Tensor empty = x.new_empty({0});
    return {flat ? y.reshape(with_last(x, out)) : y, empty, empty};
  }
  if (!flat) return {y, c, xv};
  return {y.reshape(with_last(x, out)), c.reshape(with_last(x, out)), xv.reshape(with_last(x, k))};
}

// A forward's saved tensor has the shape (..., last) of x's leading dims; the placeholder for "not saved" is (0,).
bool is_saved(const at::Tensor& t, const at::Tensor& x, int64_t last) {
  return t.sizes() == at::IntArrayRef(with_last(x, last));
}

Grads linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
                          const at::Tensor& s, const at::Tensor& U, const at::Tensor& V, const at::Tensor& c_saved,
                          const at::Tensor& xv_saved, bool has_bias, c10::List<bool> needs) {
  const bool nx = needs[0], nw = needs[1], nr = needs[2], ns = needs[3], nU = needs[4], nV = needs[5], nb = needs[6];
  const int64_t out = weight.size(0), in = weight.size(1), k = U.size(1);
  const bool flat = x.dim() != 2;
  const at::Tensor g = flat ? grad.reshape({-1, out}) : grad;
  const at::Tensor x2 = flat ? x.reshape({-1, in}) : x;
  const int64_t rows = x2.size(0);
  at::Tensor c, xv;
  if (is_saved(c_saved, x, out)) c = c_saved.reshape({rows, out});
  if (is_saved(xv_saved, x, k)) xv = xv_saved.reshape({rows, k});

  const at::Tensor empty = x.new_empty({0});
  at::Tensor dx = empty, dw = empty, dr = empty, ds = empty, dU = empty, dV = empty, db = empty;
  const at::Tensor gr = nx || ns || nw ? at::mul(g, r) : at::Tensor();
  const at::Tensor gu = k > 0 && (nx || nV) ? at::mm(g, U) : at::Tensor();
  if (nx || ns) {
    at::Tensor gx = at::mm(gr, weight);  // (M, in): the gradient w.r.t. s ⊙ x
    if (ns) ds = at::mul(gx, x2).sum(0);
    if (nx) {
      gx.mul_(s);
      if (k > 0) gx.addmm_(gu, V.t());
      dx = gx.reshape(x.sizes());
    }
  }
  if (nw) dw = at::mm(gr.t(), at::mul(x2, s));
  if (nr) dr = at::mul(g, c.defined() ? c : at::linear(at::mul(x2, s), weight)).sum(0);
  if (nU) dU = at::mm(g.t(), xv.defined() ? xv : at::mm(x2, V));
  if (nV) dV = k > 0 ? at::mm(x2.t(), gu) : at::zeros_like(V);
  if (nb && has_bias) db = g.sum(0);
  return {dx, dw, dr, ds, dU, dV, db};
}

// The autograd of one eager call served by these kernels, in C++: forward = linear_cpu with save, backward =
// linear_backward_cpu on the saved tensors with the mask of the inputs that need a gradient — the same kernels the
// registered op halrp::perturbed_linear runs (halrp_fast/ops.py), without a Python autograd.Function around them
// (at serving sizes that wrapper costs more than the arithmetic; bench/bench_overhead.py).
class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& r, const at::Tensor& s, const at::Tensor& U, const at::Tensor& V,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the kernels' own ATen calls record no graph
    auto [y, c, xv] = linear_cpu(x, weight, r, s, U, V, bias, /*save=*/true);
    ctx->save_for_backward({x, weight, r, s, U, V, c, xv});
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    c10::List<bool> needs;  // (x, weight, r, s, U, V, bias); an absent bias is no input of the node
    for (size_t i = 0; i < 7; ++i) needs.push_back((i < 6 || has_bias) && ctx->needs_input_grad(i));
    auto [dx, dw, dr, ds, dU, dV, db] = linear_backward_cpu(grads[0].contiguous(), saved[0], saved[1], saved[2],
                                                            saved[3], saved[4], saved[5], saved[6], saved[7], has_bias,
                                                            needs);
    torch::autograd::variable_list out{dx, dw, dr, ds, dU, dV, db};
    for (size_t i = 0; i < 7; ++i)
      if (!needs[i]) out[i] = at::Tensor();
    return out;
  }
};

at::Tensor linear_autograd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r, const at::Tensor& s,
                               const at::Tensor& U, const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  return LinearFunction::apply(x, weight, r, s, U, V, bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(_halrp_C, m) {
  m.def("linear_autograd_cpu(Tensor x, Tensor weight, Tensor r, Tensor s, Tensor U, Tensor V, Tensor? bias) -> Tensor");
  m.def("linear_cpu(Tensor x, Tensor weight, Tensor r, Tensor s, Tensor U, Tensor V, Tensor? bias, bool save) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("linear_backward_cpu(Tensor grad, Tensor x, Tensor weight, Tensor r, Tensor s, Tensor U, Tensor V, "
        "Tensor saved_base, Tensor saved_lowrank, bool has_bias, bool[] needs) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(_halrp_C, AutogradCPU, m) { m.impl("linear_autograd_cpu", TORCH_FN(linear_autograd_cpu)); }

TORCH_LIBRARY_IMPL(_halrp_C, CPU, m) {
  m.impl("linear_cpu", TORCH_FN(linear_cpu));
  m.impl("linear_backward_cpu", TORCH_FN(linear_backward_cpu));
}

}  // namespace halrp
