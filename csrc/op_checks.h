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

// Seed value read on the host (CPU kernels): the contract's range [0, 2^63).
inline uint64_t seed_value(int64_t s, const char* op) {
  TORCH_CHECK_VALUE(s >= 0, op, ": seed must be a non-negative int64, got ", s);
  return (uint64_t)s;
}

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
