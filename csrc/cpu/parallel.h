// Parallel loop shape shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace halrp {

// body(i) for i in [0, n), where each body makes BLAS calls on a small block (a run of one task's rows or images).
// With at least as many blocks as threads they run in parallel, each call on one thread: a threaded BLAS call on
// a block this small spends more on starting its threads than on the products. Otherwise they run in turn, each
// call using every thread.
template <typename F>
void for_each_block(int64_t n, const F& body) {
  if (n >= at::get_num_threads()) {
    at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) body(i);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

}  // namespace halrp
