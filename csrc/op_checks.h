// Argument checks of the vgmr:: operators, shared by the CPU kernels (csrc/cpu/*.cpp) and
// the CUDA binding (csrc/cuda/binding.cpp): one wording, one rule per argument.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError, and
// every message names the operator and the argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

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

}  // namespace checks
}  // namespace vgmr
