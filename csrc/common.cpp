// Helpers shared by the compiled kernels.
#include "halrp.h"


#include <sstream>

namespace halrp {

std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape (";
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << (t.dim() == 1 ? ",)" : ")") << ", dtype " << t.scalar_type() << ", device " << t.device();
  return os.str();
}

at::MemoryFormat conv_layout(const at::Tensor& x, const at::Tensor& weight) {
  const auto channels_last = [](const at::Tensor& t) {
    return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  };
  return channels_last(x) || channels_last(weight) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace halrp
