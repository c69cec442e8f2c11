// Shared declarations of the compiled kernels of halrp_fast (extension halrp_fast._C).
//
// Every kernel is a private op of its own in namespace `_halrp_C`, one name per kernel (`linear_mt_cpu`,
// `linear_backward_cpu`, `conv2d_mt_cpu`, ...), taking the arguments of the public `halrp` op it serves
// in the same order.  The kernels choose nothing: halrp_fast._backend alone picks the provider (the "cpp" and
// "cuda_ext" providers are these kernels), and halrp_fast.ops validates the arguments before any provider runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace halrp {

#define HALRP_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)

std::string describe(const at::Tensor& t);  // "shape (a, b), dtype float32, device cpu"

// The layout of a conv op's outputs (as F.conv2d): channels-last when x or the weight is stored channels-last
// (and not also plainly contiguous), else contiguous; halrp_fast.ops states the same in its fake kernels.
at::MemoryFormat conv_layout(const at::Tensor& x, const at::Tensor& weight);

}  // namespace halrp
