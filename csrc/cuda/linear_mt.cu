// _halrp_C::linear_mt_cuda, the kernel of halrp::perturbed_linear_mt for the "cuda_ext" provider: the base product
// by cuBLAS on the input scaled per row, the low-rank shrink and the expand + epilogue (R ⊙ c + U z + B) by the
// BGMV kernels of bgmv.cuh.  Chosen only when HALRP_FAST_BACKEND=cuda_ext (Triton is the default on CUDA);
// its arguments arrive validated by halrp_fast.ops.
#include "../halrp.h"
#include "bgmv.cuh"

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/add.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <tuple>
#include <type_traits>
#include <vector>

namespace halrp {
namespace {

#define HALRP_CHECK_LAUNCH(err) TORCH_CHECK((err) == cudaSuccess, "halrp CUDA kernel launch failed: ", \
                                            cudaGetErrorString(err))

// The caller's current CUDA stream, through the device-generic interface (no c10/cuda headers needed).
cudaStream_t current_stream(c10::Device device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

// scalar_t: the ATen element type; device_t: the CUDA type of the same layout (at::Half ~ __half, ...).
template <typename scalar_t, typename device_t>
void lowrank_epilogue(const at::Tensor& x2, const at::Tensor& ids, const at::Tensor& base, const at::Tensor& R,
                      const at::Tensor& U, const at::Tensor& V, const std::optional<at::Tensor>& B, at::Tensor& z,
                      at::Tensor& y) {
  const int64_t M = x2.size(0), in = x2.size(1), out = base.size(1), k = U.size(2);
  cudaStream_t stream = current_stream(x2.device());
  auto dev = [](const at::Tensor& t) { return reinterpret_cast<const device_t*>(t.const_data_ptr<scalar_t>()); };
  const device_t* bias = B.has_value() ? dev(*B) : nullptr;
  HALRP_CHECK_LAUNCH(cuda::bgmv_shrink<device_t>(dev(x2), in, ids.const_data_ptr<int64_t>(), dev(V), nullptr, M, in,
                                                  k, z.mutable_data_ptr<float>(), stream));
  device_t* yp = reinterpret_cast<device_t*>(y.mutable_data_ptr<scalar_t>());
  auto expand = [&](auto rank_tile) {  // rank_tile: std::integral_constant, the rank bucket ≥ k
    return cuda::bgmv_expand<device_t, decltype(rank_tile)::value>(z.const_data_ptr<float>(), dev(base), out,
                                                                    ids.const_data_ptr<int64_t>(), dev(U), dev(R),
                                                                    bias, nullptr, M, out, k, yp, out, stream);
  };
  const cudaError_t err = k <= 32    ? expand(std::integral_constant<int, 32>{})
                          : k <= 64  ? expand(std::integral_constant<int, 64>{})
                          : k <= 128 ? expand(std::integral_constant<int, 128>{})
                                     : expand(std::integral_constant<int, 256>{});
  HALRP_CHECK_LAUNCH(err);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> perturbed_linear_mt_cuda(
    const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight, const at::Tensor& R, const at::Tensor& S,
    const at::Tensor& U, const at::Tensor& V, const std::optional<at::Tensor>& B, bool save) {
  const int64_t out = weight.size(0), in = weight.size(1);
  const c10::DeviceGuard guard(x.device());

  const int64_t batch = x.size(0), k = U.size(2);
  const int64_t rows = batch == 0 ? 0 : x.numel() / in;
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end() - 1), z_shape(y_shape);
  y_shape.push_back(out);
  z_shape.push_back(k);
  const at::Tensor x2 = x.reshape({rows, in}).contiguous();
  const at::Tensor ids = rows == batch ? task_ids.contiguous()
                                       : task_ids.repeat_interleave(rows / std::max<int64_t>(batch, 1));
  // Base product for the whole batch: one GEMM over W.
  const at::Tensor base = at::mm(at::mul(x2, S.index_select(0, ids)), weight.t()).contiguous();
  at::Tensor y = at::empty({rows, out}, x.options());
  at::Tensor z = at::empty({rows, k}, x.options().dtype(at::kFloat));
  const at::Tensor Rc = R.contiguous(), Uc = U.contiguous(), Vc = V.contiguous();
  const std::optional<at::Tensor> Bc = B.has_value() ? std::optional<at::Tensor>(B->contiguous()) : std::nullopt;
  if (k > 256 || x.scalar_type() == at::kDouble) {  // beyond the rank buckets, or fp64: batched ATen products
    z = at::bmm(x2.unsqueeze(1), Vc.index_select(0, ids)).squeeze(1).to(at::kFloat);
    const at::Tensor lowrank = at::bmm(z.to(x.scalar_type()).unsqueeze(1), Uc.index_select(0, ids).transpose(1, 2));
    y = at::add(at::mul(base, Rc.index_select(0, ids)), lowrank.squeeze(1));
    if (Bc) y = at::add(y, Bc->index_select(0, ids));
  } else if (rows > 0) {
    switch (x.scalar_type()) {
      case at::kFloat:
        lowrank_epilogue<float, float>(x2, ids, base, Rc, Uc, Vc, Bc, z, y);
        break;
      case at::kHalf:
        lowrank_epilogue<at::Half, __half>(x2, ids, base, Rc, Uc, Vc, Bc, z, y);
        break;
      case at::kBFloat16:
        lowrank_epilogue<at::BFloat16, __nv_bfloat16>(x2, ids, base, Rc, Uc, Vc, Bc, z, y);
        break;
      default:
        HALRP_CHECK_TYPE(false, "x must be float32, float16 or bfloat16 for the CUDA kernels, got ", describe(x));
    }
  }
  if (!save) return {y.view(y_shape), x.new_empty({0}), x.new_empty({0})};
  return {y.view(y_shape), base.view(y_shape), z.to(x.scalar_type()).view(z_shape)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(_halrp_C, m) {
  m.def("linear_mt_cuda(Tensor x, Tensor task_ids, Tensor weight, Tensor R, Tensor S, Tensor U, Tensor V, Tensor? B, "
        "bool save) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(_halrp_C, CUDA, m) { m.impl("linear_mt_cuda", TORCH_FN(perturbed_linear_mt_cuda)); }

}  // namespace halrp
