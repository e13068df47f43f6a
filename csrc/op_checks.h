// Argument checks of the vgmr:: operators, shared by the CPU kernels (csrc/cpu/*.cpp) and
// the CUDA binding (csrc/cuda/binding.cpp): one wording, one rule per argument.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError, and
// every message names the operator and the argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

namespace vgmr {
namespace checks {

inline void defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
}

inline void contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous (the op layer makes it so)");
}

inline void dim(const at::Tensor& t, int64_t n, const char* op, const char* name, const char* shape_name) {
  TORCH_CHECK_VALUE(t.dim() == n, op, ": ", name, " must have shape ", shape_name, " (", n, " dims), got ",
                    t.sizes());
}

inline void shape(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* name,
                  const char* shape_name) {
  TORCH_CHECK_VALUE(t.sizes() == want, op, ": ", name, " must have shape ", shape_name, " = ", want, ", got ",
                    t.sizes());
}

inline void dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name, const char* why) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be ", want, why, ", got ", t.scalar_type());
}

inline void same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
}

inline void same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                        const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

// The checks below take the backend's device rule `on_device(t, op, name)`: t is defined, on the
// backend's device and contiguous (the CPU kernels' check_cpu, the CUDA binding's check_cuda).

// `t`: on the backend's device and `ref`'s, of `ref`'s dtype, of shape `want` (named `shape_name`).
template <typename OnDevice>
inline void like(OnDevice on_device, const at::Tensor& t, const at::Tensor& ref, at::IntArrayRef want,
                 const char* op, const char* name, const char* ref_name, const char* shape_name) {
  on_device(t, op, name);
  same_device(t, ref, op, name, ref_name);
  same_dtype(t, ref, op, name, ref_name);
  shape(t, want, op, name, shape_name);
}

// `t`: on the backend's device and `ref`'s, of dtype `want` (`why` says which), of shape `want_shape`.
template <typename OnDevice>
inline void typed(OnDevice on_device, const at::Tensor& t, at::ScalarType want, const at::Tensor& ref,
                  at::IntArrayRef want_shape, const char* op, const char* name, const char* ref_name,
                  const char* shape_name, const char* why) {
  on_device(t, op, name);
  same_device(t, ref, op, name, ref_name);
  dtype(t, want, op, name, why);
  shape(t, want_shape, op, name, shape_name);
}

// gate_norm's gate inputs (docs/ops.md): x [B, T, D] with D >= 1 (its dtype checked by the
// backend), zpre like x, bias_row [B, D] and ln_weight [D] of dtype `param_dtype` (`why`).
template <typename OnDevice>
inline void gate_inputs(OnDevice on_device, const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x,
                        const at::Tensor& ln_weight, at::ScalarType param_dtype, const char* why, const char* op) {
  on_device(x, op, "x");
  dim(x, 3, op, "x", "[B, T, D]");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  TORCH_CHECK_VALUE(D >= 1, op, ": x must have D >= 1 features, got D = ", D);
  like(on_device, zpre, x, {B, T, D}, op, "zpre", "x", "[B, T, D]");
  typed(on_device, bias_row, param_dtype, x, {B, D}, op, "bias_row", "x", "[B, D]", why);
  typed(on_device, ln_weight, param_dtype, x, {D}, op, "ln_weight", "x", "[D]", why);
}

// gate_norm_backward's saved statistics: mean, rstd [B, T] of dtype `stat_dtype`.
template <typename OnDevice>
inline void gate_stats(OnDevice on_device, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& x,
                       at::ScalarType stat_dtype, const char* op) {
  const char* saved = " (saved by the forward)";
  typed(on_device, mean, stat_dtype, x, {x.size(0), x.size(1)}, op, "mean", "x", "[B, T]", saved);
  typed(on_device, rstd, stat_dtype, x, {x.size(0), x.size(1)}, op, "rstd", "x", "[B, T]", saved);
}

// Dropout probability: [0, 1).
inline void dropout_p(double p, const char* op) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": dropout probability p must be in [0, 1), got ", p);
}

// The dropout seed (docs/ops.md): an int64 tensor with exactly one element on `ref`'s device.
// Its value is read by the kernels from memory, never here (no host synchronisation).
inline void seed_tensor(const at::Tensor& seed, const at::Tensor& ref, const char* op, const char* ref_name) {
  TORCH_CHECK_VALUE(seed.defined(), op, ": seed is undefined (expected a one-element int64 tensor)");
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op, ": seed must be an int64 tensor, got ", seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1, op, ": seed must have exactly one element, got shape ", seed.sizes());
  same_device(seed, ref, op, "seed", ref_name);
}

// The Philox key of a seed tensor's value (docs/math.md §5a): its 64 bits read as uint64, on
// every backend (the CUDA and Triton kernels load the same bits on the device).
inline uint64_t philox_key(int64_t s) { return (uint64_t)s; }

// gate_norm_grouped: the per-modality lists (first one named in the errors) all have M >= 1
// tensors, and `seeds` is a contiguous int64 [M] tensor on the first list's device. Returns M.
inline size_t grouped_count(std::initializer_list<std::pair<at::TensorList, const char*>> lists,
                            const at::Tensor& seeds, const char* op) {
  const auto M = lists.begin()->first.size();
  TORCH_CHECK_VALUE(M >= 1, op, ": needs at least one modality, got empty lists");
  for (const auto& [list, name] : lists) {
    TORCH_CHECK_VALUE(list.size() == M, op, ": ", name, " has ", list.size(), " tensors but ",
                      lists.begin()->second, " has ", M, " (one per modality)");
  }
  defined(seeds, op, "seeds");
  dtype(seeds, at::kLong, op, "seeds", " (one int64 Philox seed per modality)");
  TORCH_CHECK_VALUE(seeds.dim() == 1 && seeds.size(0) == (int64_t)M, op, ": seeds must have shape [M] = [", M,
                    "], got ", seeds.sizes());
  contiguous(seeds, op, "seeds");
  same_device(seeds, lists.begin()->first[0], op, "seeds", "the inputs");
  return M;
}

// The operator name of modality m in a grouped op's errors: "vgmr::gate_norm_grouped (modality 1)".
inline std::string modality_op(const char* op, size_t m) {
  return std::string(op) + " (modality " + std::to_string(m) + ")";
}

// Modality m's x has the batch size of modality 0 (ranks are checked per modality).
inline void same_batch(const at::Tensor& x, const at::Tensor& x0, const std::string& opm) {
  if (x.dim() != 3 || x0.dim() != 3) return;
  TORCH_CHECK_VALUE(x.size(0) == x0.size(0), opm, ": every modality needs the batch size B of modality 0 (",
                    x0.sizes(), "), got x ", x.sizes());
}

}  // namespace checks
}  // namespace vgmr
