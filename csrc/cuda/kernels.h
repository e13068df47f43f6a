// Plain C++ launchers of the CUDA kernels (csrc/cuda/*.cu), called by the torch-typed
// binding (csrc/cuda/binding.cpp). Torch-free on purpose: raw pointers, int64 sizes and
// a cudaStream_t, so the .cu files never include torch/ATen/c10.
//
// Every launcher:
//   - assumes contiguous row-major tensors of the shapes in docs/ops.md and the
//     pointers on the current device (the binding checks and sets the device);
//   - allocates nothing and never synchronises (CUDA-graph capturable): scratch comes
//     from the caller (torch's caching allocator), sized by the *_workspace_floats()
//     query of the same shapes on the same device;
//   - returns cudaSuccess, or the first CUDA error (launch errors via cudaGetLastError),
//     or cudaErrorInvalidValue for arguments it cannot handle; the binding turns a
//     non-success code into a TORCH_CHECK with cudaGetErrorString.
//   - accepts empty sizes (nothing is launched; outputs of size 0 are left alone).
#pragma once

#include <cuda_runtime_api.h>  // cudaStream_t, cudaError_t (CUDA runtime only, no torch)
#include <stdint.h>

namespace vgmr {
namespace gpu {

// Element type of the [B, T, D] / [B, M, D] tensors. Side inputs (bias_row, ln_weight,
// ln_bias), mean/rstd and all reductions are float32.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- summary_pool (docs/math.md §1) --------------------------------------------------------------
// h [B, T, D]; mask [B, T] (1 byte per step, nonzero = valid) or nullptr (all valid).
// mean, max [B, D] (dtype); argmax [B, D] int32: first valid maximal step, -1 if none
// (then mean = max = 0); NaN counts as maximal (the first NaN wins).
cudaError_t summary_pool_fwd_launch(DType dtype, const void* h, const uint8_t* mask, void* mean, void* max,
                                    int32_t* argmax, int64_t B, int64_t T, int64_t D, cudaStream_t stream);

// Scratch (floats) for summary_pool_bwd_launch: max(1, n_b) per b when a mask is given.
int64_t summary_pool_bwd_workspace_floats(int64_t B, bool has_mask);

// dh[b,t,d] = mask[b,t] * dmean[b,d] / max(1, n_b) + (t == argmax[b,d]) * dmax[b,d].
// dmean, dmax [B, D] and dh [B, T, D] of one dtype; workspace: >= the query above.
cudaError_t summary_pool_bwd_launch(DType dtype, const void* dmean, const void* dmax, const uint8_t* mask,
                                    const int32_t* argmax, void* dh, float* workspace, int64_t B, int64_t T,
                                    int64_t D, cudaStream_t stream);

// ---- interaction (docs/math.md §2) ---------------------------------------------------------------
// s [B, M, D] -> u [B, M, (3M-1) D]; M >= 2.
cudaError_t interaction_fwd_launch(DType dtype, const void* s, void* u, int64_t B, int64_t M, int64_t D,
                                   cudaStream_t stream);
// du [B, M, (3M-1) D], s [B, M, D] -> ds [B, M, D] (d|x|/dx = 0 at x = 0).
cudaError_t interaction_bwd_launch(DType dtype, const void* du, const void* s, void* ds, int64_t B, int64_t M,
                                   int64_t D, cudaStream_t stream);

// ---- gate_norm (docs/math.md §5) -----------------------------------------------------------------
// zpre, x, y [B, T, D] (dtype); bias_row [B, D], w, b [D], mean, rstd [B, T] float32.
// Dropout (if `dropout`): element (r = b*T + t, c) kept iff Philox word >= keep_threshold,
// kept values scaled by keep_scale (csrc/vgmr_math.h). `seed`: device pointer to one int64,
// the Philox key, read by the kernels (never by the host: graph replays see its new value);
// not read at all when !dropout (may then be nullptr).
cudaError_t gate_norm_fwd_launch(DType dtype, const void* zpre, const float* bias_row, const void* x,
                                 const float* w, const float* b, void* y, float* mean, float* rstd, int64_t B,
                                 int64_t T, int64_t D, float alpha, float beta, uint32_t keep_threshold,
                                 float keep_scale, const int64_t* seed, bool dropout, cudaStream_t stream);

// Scratch (floats) for gate_norm_bwd_launch with these sizes on the current device
// (per-block partials of dln_weight/dln_bias and, when T is split, of dbias_row).
int64_t gate_norm_bwd_workspace_floats(DType dtype, int64_t B, int64_t T, int64_t D);

// dy, zpre, x, dzpre, dx [B, T, D] (dtype; dx null: not written); bias_row [B, D], w [D], rstd [B, T],
// dbias_row [B, D], dw, db [D] float32. Deterministic: fixed-order reductions, no atomics.
cudaError_t gate_norm_bwd_launch(DType dtype, const void* dy, const void* zpre, const float* bias_row,
                                 const void* x, const float* w, const float* rstd, void* dzpre,
                                 float* dbias_row, void* dx, float* dw, float* db, float* workspace,
                                 int64_t workspace_floats, int64_t B, int64_t T, int64_t D, float alpha, float beta,
                                 uint32_t keep_threshold, float keep_scale, const int64_t* seed, bool dropout,
                                 cudaStream_t stream);

}  // namespace gpu
}  // namespace vgmr
