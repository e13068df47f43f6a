// Per-thread scratch of the CPU kernels: one zeroed float workspace tensor, a slice per pool
// thread, and the padded stride their row buffers use. CPU only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace vgmr {
namespace cpu {

// Buffer stride: rounded up to a cache line plus a skew (buffers do not share an offset
// modulo 4 KiB), and >= 16 floats of slack so a row's last masked vector may read past it.
inline int64_t padded(int64_t n) { return (n + 15) / 16 * 16 + 48; }

// `per_thread` zeroed floats for each of at::get_num_threads() pool threads, on x's device.
struct ThreadWorkspaces {
  int64_t nthreads, per_thread;
  at::Tensor storage;
  float* base;
  ThreadWorkspaces(const at::Tensor& x, int64_t per_thread_floats)
      : nthreads(std::max<int64_t>(1, at::get_num_threads())),
        per_thread(per_thread_floats),
        storage(at::zeros({nthreads * per_thread}, x.options().dtype(at::kFloat))),
        base(storage.mutable_data_ptr<float>()) {}
  // at::parallel_for over [begin, end) calling f(begin, end, this thread's buffers); a thread
  // beyond the launch count (the pool resized meanwhile) gets its own zeroed buffers.
  template <typename F>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) const {
    at::parallel_for(begin, end, grain, [&](int64_t b0, int64_t b1) {
      const int64_t tid = at::get_thread_num();
      if (tid >= 0 && tid < nthreads) {
        f(b0, b1, base + tid * per_thread);
      } else {
        std::vector<float> spare(per_thread, 0.0f);
        f(b0, b1, spare.data());
      }
    });
  }
};

}  // namespace cpu
}  // namespace vgmr
