// Argument checks and the per-call routing between the compiled kernels and the Python kernels.
#include "halrp.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <memory>
#include <sstream>

namespace halrp {

std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape (";
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << (t.dim() == 1 ? ",)" : ")") << ", dtype " << t.scalar_type() << ", device " << t.device();
  return os.str();
}

void check_like(const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  HALRP_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", describe(t));
  HALRP_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", describe(t));
  HALRP_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
                    "), got ", describe(t));
}

void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef sizes, const char* meaning) {
  HALRP_CHECK_VALUE(t.sizes() == sizes, name, " must have shape ", sizes, " ", meaning, ", got ", describe(t));
}

void check_task_ids(const at::Tensor& task_ids, int64_t rows, int64_t num_tasks, const at::Tensor& x) {
  HALRP_CHECK_TYPE(task_ids.scalar_type() == at::kLong, "task_ids must be an int64 tensor of shape (M,), got ",
                   describe(task_ids));
  HALRP_CHECK_VALUE(task_ids.dim() == 1 && task_ids.size(0) == rows, "task_ids must have shape (", rows,
                    ",) (one task per row of x), got ", describe(task_ids));
  HALRP_CHECK_VALUE(task_ids.device() == x.device(), "task_ids must be on the device of x (", x.device(), "), got ",
                    describe(task_ids));
  if (rows == 0) return;
  int64_t lo, hi;
  if (task_ids.is_cpu()) {
    const at::Tensor ids = task_ids.contiguous();
    const int64_t* p = ids.const_data_ptr<int64_t>();
    const auto [mn, mx] = std::minmax_element(p, p + rows);
    lo = *mn, hi = *mx;
  } else {  // one reduction and one device sync
    const at::Tensor bounds = at::stack({task_ids.min(), task_ids.max()}).cpu();
    lo = bounds[0].item<int64_t>(), hi = bounds[1].item<int64_t>();
  }
  HALRP_CHECK_VALUE(lo >= 0 && hi < num_tasks, "task_ids must lie in [0, ", num_tasks,
                    ") (the size of the task banks), found ", lo < 0 ? lo : hi);
}

int64_t check_banks(const at::Tensor& x, const at::Tensor& R, const at::Tensor& S, const at::Tensor& U,
                    const at::Tensor& V, const std::optional<at::Tensor>& B, int64_t out, int64_t in) {
  check_like("R", R, x);
  check_like("S", S, x);
  check_like("U", U, x);
  check_like("V", V, x);
  HALRP_CHECK_VALUE(R.dim() == 2 && R.size(1) == out, "R must have shape (T, out=", out, "), got ", describe(R));
  const int64_t T = R.size(0);
  check_shape("S", S, {T, in}, "(T, in)");
  HALRP_CHECK_VALUE(U.dim() == 3, "U must have shape (T, out=", out, ", k), got ", describe(U));
  const int64_t k = U.size(2);
  check_shape("U", U, {T, out, k}, "(T, out, k)");
  check_shape("V", V, {T, in, k}, "(T, in, k) with the rank k of U");
  if (B.has_value()) {
    check_like("B", *B, x);
    check_shape("B", *B, {T, out}, "(T, out)");
  }
  return T;
}

bool native_enabled(c10::DeviceType device) {
  const char* raw = std::getenv("HALRP_FAST_BACKEND");
  std::string want = raw ? raw : "";
  want.erase(std::remove_if(want.begin(), want.end(), [](unsigned char c) { return std::isspace(c); }), want.end());
  std::transform(want.begin(), want.end(), want.begin(), [](unsigned char c) { return std::tolower(c); });
  if (device == c10::DeviceType::CPU) return want.empty() || want == "auto" || want == "cpp";
  return device == c10::DeviceType::CUDA && want == "cuda_ext";
}

namespace {

// Runs the compiled kernel, or the Python kernel of the same op when the environment chooses another provider
// (the Python kernel then asks halrp_fast._backend, which never picks "cpp" in that case: no loop).
class Router final : public c10::OperatorKernel {
 public:
  Router(c10::KernelFunction native, c10::DeviceType device) : native_(std::move(native)), device_(device) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    if (native_enabled(device_)) {
      native_.callBoxed(op, keys, stack);
    } else {
      op.callBoxedForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd, *stack);
    }
  }

 private:
  c10::KernelFunction native_;
  c10::DeviceType device_;
};

}  // namespace

at::MemoryFormat conv_layout(const at::Tensor& x, const at::Tensor& weight) {
  const auto channels_last = [](const at::Tensor& t) {
    return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  };
  return channels_last(x) || channels_last(weight) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void register_routed(torch::Library& m, const char* name, c10::KernelFunction native, c10::DeviceType device) {
  m.impl(name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<Router>(std::move(native), device)));
}

}  // namespace halrp
