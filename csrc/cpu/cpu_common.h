// Helpers shared by the three CPU kernel files (csrc/cpu/*.cpp). CPU only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "op_checks.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

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

// Argument checks: csrc/op_checks.h (shared with the CUDA binding); the CPU-only one here.
inline void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  checks::defined(t, op, name);
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  checks::contiguous(t, op, name);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the CPU kernels' entry points (csrc/cpu/<op>.cpp), registered in csrc/ops.cpp ----------
using Tensors = std::vector<at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensors3 summary_pool_cpu(const at::Tensor& h, const c10::optional<at::Tensor>& mask);
at::Tensor summary_pool_backward_cpu(const at::Tensor& dmean, const at::Tensor& dmax,
                                     const c10::optional<at::Tensor>& mask, const at::Tensor& argmax, int64_t T);
at::Tensor interaction_cpu(const at::Tensor& s);
at::Tensor interaction_backward_cpu(const at::Tensor& du, const at::Tensor& s);
Tensors3 gate_norm_cpu(const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x,
                       const at::Tensor& ln_weight, const at::Tensor& ln_bias, double alpha, double beta, double p,
                       const at::Tensor& seed);
Tensors5 gate_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& zpre, const at::Tensor& bias_row,
                                const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& mean,
                                const at::Tensor& rstd, double alpha, double beta, double p, const at::Tensor& seed);
std::tuple<Tensors, Tensors, Tensors> gate_norm_grouped_cpu(at::TensorList zpre, at::TensorList bias_row,
                                                            at::TensorList x, at::TensorList ln_weight,
                                                            at::TensorList ln_bias, double alpha, double beta,
                                                            double p, const at::Tensor& seeds);
std::tuple<Tensors, Tensors, Tensors, Tensors, Tensors> gate_norm_grouped_backward_cpu(
    at::TensorList dy, at::TensorList zpre, at::TensorList bias_row, at::TensorList x, at::TensorList ln_weight,
    at::TensorList mean, at::TensorList rstd, double alpha, double beta, double p, const at::Tensor& seeds);

}  // namespace cpu
}  // namespace vgmr
