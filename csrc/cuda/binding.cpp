// CUDA dispatch key of the vgmr:: operators (schemas: vgmr_fast/schemas.py, contract: docs/ops.md).
// The thin torch-typed layer: argument checks (TORCH_CHECK_VALUE / _TYPE -> ValueError /
// TypeError), output and scratch allocation through torch's caching allocator, the device
// guard and the current stream; the kernels themselves are raw-pointer launchers
// (csrc/cuda/kernels.h). No host synchronisation anywhere: every op is CUDA-graph capturable.
// Built only with VGMR_WITH_CUDA (setup.py).
#ifdef VGMR_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/kernels.h"
#include "gate_norm_entries.h"
#include "op_checks.h"
#include "op_table.h"
#include "vgmr_math.h"

namespace vgmr {
namespace cpu {
// Debug switch shared with the CPU kernels (defined in csrc/ops.cpp, toggled from Python
// by vgmr_fast._C.set_debug_nan_fill): fill outputs with NaN (integers: -7) before the
// kernels write them, so an element a kernel forgets shows up in the tests.
extern std::atomic<bool> g_debug_nan_fill;
}  // namespace cpu
}  // namespace vgmr

namespace {

using vgmr::gpu::DType;

#define VGMR_CUDA_OK(op, expr)                                                                  \
  do {                                                                                          \
    const cudaError_t vgmr_err_ = (expr);                                                       \
    TORCH_CHECK(vgmr_err_ == cudaSuccess, op, ": CUDA kernel launch failed: ",                  \
                cudaGetErrorName(vgmr_err_), ": ", cudaGetErrorString(vgmr_err_));             \
  } while (0)

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (vgmr::cpu::g_debug_nan_fill.load(std::memory_order_relaxed)) {
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(-7);
    }
  }
  return t;
}

// Argument checks: csrc/op_checks.h (shared with the CPU kernels); the CUDA-only one here.
void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  vgmr::checks::defined(t, op, name);
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
  vgmr::checks::contiguous(t, op, name);
}

// `t`: a CUDA tensor on `ref`'s device, of `ref`'s dtype / of dtype `dtype` (csrc/op_checks.h).
void check_like(const at::Tensor& t, const at::Tensor& ref, at::IntArrayRef want, const char* op, const char* name,
                const char* ref_name, const char* shape_name) {
  vgmr::checks::like(check_cuda, t, ref, want, op, name, ref_name, shape_name);
}
void check_typed(const at::Tensor& t, at::ScalarType dtype, const at::Tensor& ref, at::IntArrayRef want,
                 const char* op, const char* name, const char* ref_name, const char* shape_name, const char* why) {
  vgmr::checks::typed(check_cuda, t, dtype, ref, want, op, name, ref_name, shape_name, why);
}

DType element_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16 on CUDA, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}




// Optional [B, T] bool mask on h's device; returns its data (nullptr when absent).
const uint8_t* mask_ptr(const std::optional<at::Tensor>& mask, const at::Tensor& ref, int64_t B, int64_t T,
                        const char* op) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  const at::Tensor& m = *mask;
  check_typed(m, at::kBool, ref, {B, T}, op, "mask", "the features", "[B, T]", " (True = valid step)");
  return reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
}

struct DropoutArgs {
  uint32_t threshold;
  float scale;
  const int64_t* seed;  // device pointer: the kernels read the value (no host sync)
  bool on;
};

// The kernels use the seed's 64 bits as the Philox key (checks::philox_key: every backend's
// rule), read on the device: no host sync.
DropoutArgs dropout_args(double p, const int64_t* seed, const char* op) {
  vgmr::checks::dropout_p(p, op);
  DropoutArgs d;
  d.on = p > 0.0;
  d.threshold = vgmr::dropout_threshold(p);
  d.scale = (float)vgmr::dropout_scale(p);
  d.seed = seed;
  return d;
}

// ---- summary_pool ------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> summary_pool_cuda(const at::Tensor& h,
                                                                 const std::optional<at::Tensor>& mask) {
  const char* op = "vgmr::summary_pool";
  check_cuda(h, op, "h");
  vgmr::checks::dim(h, 3, op, "h", "[B, T, D]");
  const DType dt = element_dtype(h, op, "h");
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
  TORCH_CHECK_VALUE(T <= std::numeric_limits<int32_t>::max(), op, ": T = ", T,
                    " does not fit the int32 argmax");
  const c10::cuda::CUDAGuard guard(h.device());
  const uint8_t* mp = mask_ptr(mask, h, B, T, op);
  at::Tensor mean = new_output({B, D}, h.options());
  at::Tensor mx = new_output({B, D}, h.options());
  at::Tensor argmax = new_output({B, D}, h.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VGMR_CUDA_OK(op, vgmr::gpu::summary_pool_fwd_launch(dt, h.const_data_ptr(), mp, mean.mutable_data_ptr(),
                                                      mx.mutable_data_ptr(), argmax.mutable_data_ptr<int32_t>(), B,
                                                      T, D, stream));
  return {mean, mx, argmax};
}

at::Tensor summary_pool_backward_cuda(const at::Tensor& dmean, const at::Tensor& dmax,
                                      const std::optional<at::Tensor>& mask, const at::Tensor& argmax, int64_t T) {
  const char* op = "vgmr::summary_pool_backward";
  check_cuda(dmean, op, "dmean");
  vgmr::checks::dim(dmean, 2, op, "dmean", "[B, D]");
  const DType dt = element_dtype(dmean, op, "dmean");
  const int64_t B = dmean.size(0), D = dmean.size(1);
  TORCH_CHECK_VALUE(T >= 0 && T <= std::numeric_limits<int32_t>::max(), op, ": T must be in [0, 2^31), got ", T);
  check_like(dmax, dmean, {B, D}, op, "dmax", "dmean", "[B, D]");
  check_typed(argmax, at::kInt, dmean, {B, D}, op, "argmax", "dmean", "[B, D]", " (int32, from the forward)");
  const c10::cuda::CUDAGuard guard(dmean.device());
  const uint8_t* mp = mask_ptr(mask, dmean, B, T, op);
  at::Tensor dh = new_output({B, T, D}, dmean.options());
  const int64_t ws = vgmr::gpu::summary_pool_bwd_workspace_floats(B, mp != nullptr);
  at::Tensor work;
  if (ws > 0) work = at::empty({ws}, dmean.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VGMR_CUDA_OK(op, vgmr::gpu::summary_pool_bwd_launch(dt, dmean.const_data_ptr(), dmax.const_data_ptr(), mp,
                                                      argmax.const_data_ptr<int32_t>(), dh.mutable_data_ptr(),
                                                      ws > 0 ? work.mutable_data_ptr<float>() : nullptr, B, T, D,
                                                      stream));
  return dh;
}

// ---- interaction -------------------------------------------------------------------------------
at::Tensor interaction_cuda(const at::Tensor& s) {
  const char* op = "vgmr::interaction";
  check_cuda(s, op, "s");
  vgmr::checks::dim(s, 3, op, "s", "[B, M, D]");
  const DType dt = element_dtype(s, op, "s");
  const int64_t B = s.size(0), M = s.size(1), D = s.size(2);
  TORCH_CHECK_VALUE(M >= 2, op, ": s needs M >= 2 modalities, got M = ", M);
  const c10::cuda::CUDAGuard guard(s.device());
  at::Tensor u = new_output({B, M, (3 * M - 1) * D}, s.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VGMR_CUDA_OK(op, vgmr::gpu::interaction_fwd_launch(dt, s.const_data_ptr(), u.mutable_data_ptr(), B, M, D, stream));
  return u;
}

at::Tensor interaction_backward_cuda(const at::Tensor& du, const at::Tensor& s) {
  const char* op = "vgmr::interaction_backward";
  check_cuda(s, op, "s");
  vgmr::checks::dim(s, 3, op, "s", "[B, M, D]");
  const int64_t B = s.size(0), M = s.size(1), D = s.size(2);
  TORCH_CHECK_VALUE(M >= 2, op, ": s needs M >= 2 modalities, got M = ", M);
  check_cuda(du, op, "du");
  vgmr::checks::same_device(du, s, op, "du", "s");
  const DType dt = element_dtype(du, op, "du");
  vgmr::checks::same_dtype(du, s, op, "du", "s");
  vgmr::checks::shape(du, {B, M, (3 * M - 1) * D}, op, "du", "[B, M, (3M-1) D]");
  const c10::cuda::CUDAGuard guard(s.device());
  at::Tensor ds = new_output({B, M, D}, du.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VGMR_CUDA_OK(op, vgmr::gpu::interaction_bwd_launch(dt, du.const_data_ptr(), s.const_data_ptr(),
                                                     ds.mutable_data_ptr(), B, M, D, stream));
  return ds;
}

// ---- gate_norm ---------------------------------------------------------------------------------
constexpr const char* kFloatParam = " (float32 for float32/half inputs; the op layer casts it)";

// zpre, x [B, T, D] (one dtype), bias_row [B, D], ln_weight [D] float32, all on x's device.
DType check_gate_inputs(const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x,
                        const at::Tensor& ln_weight, const char* op) {
  vgmr::checks::gate_inputs(check_cuda, zpre, bias_row, x, ln_weight, at::kFloat, kFloatParam, op);
  return element_dtype(x, op, "x");
}

// One modality; `seed`: device pointer to its int64 key (checked by the caller).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_norm_one(const at::Tensor& zpre, const at::Tensor& bias_row,
                                                             const at::Tensor& x, const at::Tensor& ln_weight,
                                                             const at::Tensor& ln_bias, double alpha, double beta,
                                                             double p, const int64_t* seed, const char* op) {
  const DType dt = check_gate_inputs(zpre, bias_row, x, ln_weight, op);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  check_typed(ln_bias, at::kFloat, x, {D}, op, "ln_bias", "x", "[D]", kFloatParam);
  const DropoutArgs drop = dropout_args(p, seed, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = new_output({B, T, D}, x.options());
  at::Tensor mean = new_output({B, T}, x.options().dtype(at::kFloat));
  at::Tensor rstd = new_output({B, T}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VGMR_CUDA_OK(op, vgmr::gpu::gate_norm_fwd_launch(
                       dt, zpre.const_data_ptr(), bias_row.const_data_ptr<float>(), x.const_data_ptr(),
                       ln_weight.const_data_ptr<float>(), ln_bias.const_data_ptr<float>(), y.mutable_data_ptr(),
                       mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), B, T, D, (float)alpha,
                       (float)beta, drop.threshold, drop.scale, drop.seed, drop.on, stream));
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_norm_backward_one(
    const at::Tensor& dy, const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x,
    const at::Tensor& ln_weight, const at::Tensor& mean, const at::Tensor& rstd, double alpha, double beta, double p,
    const int64_t* seed, bool need_dx, const char* op) {
  const DType dt = check_gate_inputs(zpre, bias_row, x, ln_weight, op);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  check_like(dy, x, {B, T, D}, op, "dy", "x", "[B, T, D]");
  vgmr::checks::gate_stats(check_cuda, mean, rstd, x, at::kFloat, op);
  const DropoutArgs drop = dropout_args(p, seed, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor dzpre = new_output({B, T, D}, zpre.options());
  at::Tensor dx = need_dx ? new_output({B, T, D}, x.options()) : at::empty({0}, x.options());
  at::Tensor dbias_row = new_output({B, D}, f32);
  at::Tensor dw = new_output({D}, f32);
  at::Tensor db = new_output({D}, f32);
  const int64_t ws = vgmr::gpu::gate_norm_bwd_workspace_floats(dt, B, T, D);
  at::Tensor work = at::empty({std::max<int64_t>(ws, 1)}, f32);  // caching allocator: graph-safe
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VGMR_CUDA_OK(op, vgmr::gpu::gate_norm_bwd_launch(
                       dt, dy.const_data_ptr(), zpre.const_data_ptr(), bias_row.const_data_ptr<float>(),
                       x.const_data_ptr(), ln_weight.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                       dzpre.mutable_data_ptr(), dbias_row.mutable_data_ptr<float>(),
                       need_dx ? dx.mutable_data_ptr() : nullptr, dw.mutable_data_ptr<float>(),
                       db.mutable_data_ptr<float>(), work.mutable_data_ptr<float>(), ws, B, T, D, (float)alpha,
                       (float)beta, drop.threshold, drop.scale, drop.seed, drop.on, stream));
  return {dzpre, dbias_row, dx, dw, db};
}

// Modality m's x: on the CUDA device of modality 0's.
void check_modality_device(const at::Tensor& x, const at::Tensor& x0, const char* opm) {
  check_cuda(x, opm, "x");
  vgmr::checks::same_device(x, x0, opm, "x", "x[0]");
}

using GateNormCuda = vgmr::GateNormEntries<gate_norm_one, gate_norm_backward_one, check_cuda, check_modality_device>;
constexpr auto& gate_norm_cuda = GateNormCuda::forward;
constexpr auto& gate_norm_backward_cuda = GateNormCuda::backward;
constexpr auto& gate_norm_grouped_cuda = GateNormCuda::grouped;
constexpr auto& gate_norm_grouped_backward_cuda = GateNormCuda::grouped_backward;

}  // namespace

TORCH_LIBRARY_IMPL(vgmr, CUDA, m) { VGMR_IMPL_KERNEL_OPS(m, _cuda) }

#endif  // VGMR_WITH_CUDA
