// Shared declarations of the compiled kernels of halrp_fast (extension halrp_fast._C).
//
// The op schemas live in Python (halrp_fast/ops.py, namespace `halrp`); this extension only adds
// implementations for them with TORCH_LIBRARY_IMPL.  Every implementation is *routed*: it runs the
// compiled kernel when the environment asks for it (see native_enabled) and otherwise hands the call
// to the op's Python kernel (CompositeExplicitAutograd), so HALRP_FAST_BACKEND keeps choosing the
// provider per call on every path (eager, torch.ops, torch.compile).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace halrp {

// Argument checks: TypeError for dtype problems, ValueError for shapes, devices and values.
#define HALRP_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)
#define HALRP_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

std::string describe(const at::Tensor& t);  // "shape (a, b), dtype float32, device cpu"

// `t` floating point with the dtype and device of `ref` (named `name` / `ref_name` in errors).
void check_like(const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name = "x");
// `t` has exactly `sizes`; `meaning` spells the expected layout, e.g. "(T, out)".
void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef sizes, const char* meaning);
// task_ids: int64, one dimension of length `rows`, values in [0, num_tasks).
void check_task_ids(const at::Tensor& task_ids, int64_t rows, int64_t num_tasks, const at::Tensor& x);
// Banks R (T, out), S (T, in), U (T, out, k), V (T, in, k), B (T, out) like `x`; returns T.
int64_t check_banks(const at::Tensor& x, const at::Tensor& R, const at::Tensor& S, const at::Tensor& U,
                    const at::Tensor& V, const std::optional<at::Tensor>& B, int64_t out, int64_t in);

// True when HALRP_FAST_BACKEND (read on every call) lets the compiled kernels serve `device`:
// CPU: unset, "auto" or "cpp"; CUDA: only "cuda_ext" (the Triton kernels serve CUDA in auto mode).
// The layout of a conv op's outputs (as F.conv2d): channels-last when x or the weight is stored channels-last
// (and not also plainly contiguous), else contiguous; halrp_fast.ops states the same in its fake kernels.
at::MemoryFormat conv_layout(const at::Tensor& x, const at::Tensor& weight);

bool native_enabled(c10::DeviceType device);

// Registers `native` for op `name` of `m`'s dispatch key behind the router described above.
void register_routed(torch::Library& m, const char* name, c10::KernelFunction native, c10::DeviceType device);

}  // namespace halrp
