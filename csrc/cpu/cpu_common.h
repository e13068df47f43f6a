// Helpers shared by the three CPU kernel files (csrc/cpu/*.cpp). CPU only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "gate_norm_entries.h"
#include "op_checks.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// GCC function multi-versioning for the hot row loops: one clone per ISA level,
// chosen once at load time (ifunc), so the default x86-64 build still vectorises
// with AVX2/AVX-512 where the CPU has them. Other compilers/architectures: no clones.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(VGMR_NO_CLONES)
#define VGMR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define VGMR_X86_MULTIVERSION 1
#else
#define VGMR_CLONES
#endif

#if defined(__GNUC__)
#define VGMR_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define VGMR_ALWAYS_INLINE inline
#endif

namespace vgmr {
namespace cpu {

// Debug mode (tests): fill every output with NaN before the kernel writes it, so an
// element the kernel forgets shows up. Toggled from Python: vgmr_fast._C.set_debug_nan_fill.
extern std::atomic<bool> g_debug_nan_fill;
// Tests: run the 8-lane kernels even where the 16-lane AVX-512 ones would be chosen, so the
// AVX2 / baseline code path is exercised on an AVX-512 machine too.
extern std::atomic<bool> g_force_narrow_simd;

inline void debug_fill(at::Tensor& t) {
  if (g_debug_nan_fill.load(std::memory_order_relaxed)) {
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(-7);  // integer outputs: a value no kernel writes
    }
  }
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  debug_fill(t);
  return t;
}

inline const char* device_name(const at::Tensor& t) { return t.is_cpu() ? "cpu" : "non-cpu"; }

// Argument checks: csrc/op_checks.h (shared with the CUDA binding); the CPU device rule here.
inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  checks::defined(t, op, name);
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ",
                    t.device());
  checks::contiguous(t, op, name);
}

inline void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the CPU kernels' entry points (csrc/cpu/<op>.cpp), registered in csrc/ops.cpp ----------
Tensors3 summary_pool_cpu(const at::Tensor& h, const c10::optional<at::Tensor>& mask);
at::Tensor summary_pool_backward_cpu(const at::Tensor& dmean, const at::Tensor& dmax,
                                     const c10::optional<at::Tensor>& mask, const at::Tensor& argmax, int64_t T);
at::Tensor interaction_cpu(const at::Tensor& s);
at::Tensor interaction_backward_cpu(const at::Tensor& du, const at::Tensor& s);

// gate_norm of one modality (csrc/cpu/gate_norm.cpp); the four gate_norm operators on top.
Tensors3 gate_norm_one(const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x,
                       const at::Tensor& ln_weight, const at::Tensor& ln_bias, double alpha, double beta, double p,
                       const int64_t* seed, const char* op);
Tensors5 gate_norm_backward_one(const at::Tensor& dy, const at::Tensor& zpre, const at::Tensor& bias_row,
                                const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& mean,
                                const at::Tensor& rstd, double alpha, double beta, double p, const int64_t* seed,
                                bool need_dx, const char* op);
// check_main / check_cpu_float check every input's device: nothing to add here
inline void no_device_check(const at::Tensor&, const char*, const char*) {}
inline void no_modality_check(const at::Tensor&, const at::Tensor&, const char*) {}
using GateNormCpu = GateNormEntries<gate_norm_one, gate_norm_backward_one, no_device_check, no_modality_check>;
inline constexpr auto& gate_norm_cpu = GateNormCpu::forward;
inline constexpr auto& gate_norm_backward_cpu = GateNormCpu::backward;
inline constexpr auto& gate_norm_grouped_cpu = GateNormCpu::grouped;
inline constexpr auto& gate_norm_grouped_backward_cpu = GateNormCpu::grouped_backward;

}  // namespace cpu
}  // namespace vgmr
