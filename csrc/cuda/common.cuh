// Device-side helpers shared by the CUDA kernel files (csrc/cuda/*.cu). No torch headers:
// element conversions (explicit intrinsics only, so the file builds under torch's
// -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__ flags), 16-byte
// packs, deterministic warp/block sums, launch-size helpers and the dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>
#include <type_traits>

#include "cuda/kernels.h"
#include "vgmr_math.h"

namespace vgmr {
namespace gpu {

// ---- element conversions (fp32 accumulation for every dtype) ------------------------------
// Both directions of one element type in one place: float (the primary template) is the
// identity, the half types convert with round-to-nearest intrinsics.
template <typename T>
struct Convert {
  static_assert(std::is_same_v<T, float>, "element types: float, __half, __nv_bfloat16");
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_f(T v) { return Convert<T>::to_f(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v) { return Convert<T>::from_f(v); }

// ---- aligned packs: N elements loaded/stored as 16-byte (or smaller) transactions ---------
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// Load N consecutive elements at p (aligned to min(16, N * sizeof(T)) bytes) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, float (&out)[N]) {
  constexpr int P = (int)(16 / sizeof(T)) < N ? (int)(16 / sizeof(T)) : N;  // elements per transaction
#pragma unroll
  for (int k = 0; k < N; k += P) {
    const Pack<T, P> pk = *reinterpret_cast<const Pack<T, P>*>(p + k);
#pragma unroll
    for (int j = 0; j < P; ++j) out[k + j] = to_f<T>(pk.v[j]);
  }
}

// Unpack a 16-byte raw pack (loaded earlier, e.g. prefetched) into floats.
template <typename T, int N>
__device__ __forceinline__ void unpack(const Pack<T, N>& pk, float (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_f<T>(pk.v[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const float (&in)[N]) {
  constexpr int P = (int)(16 / sizeof(T)) < N ? (int)(16 / sizeof(T)) : N;
#pragma unroll
  for (int k = 0; k < N; k += P) {
    Pack<T, P> pk;
#pragma unroll
    for (int j = 0; j < P; ++j) pk.v[j] = from_f<T>(in[k + j]);
    *reinterpret_cast<Pack<T, P>*>(p + k) = pk;
  }
}

// ---- deterministic reductions ---------------------------------------------------------------
// XOR butterfly: every lane ends with the same bits (a + b == b + a in IEEE), and the order
// of additions depends only on the lane layout, so results are run-to-run identical.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Sum over a block whose size is a multiple of 32 (<= 1024); every thread gets the result.
// `sh` holds >= 32 float2 of shared memory; safe to call repeatedly (leading barrier).
__device__ __forceinline__ float2 block_sum(float2 v, float2* sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // the previous call's readers are done with sh
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float2 s = lane < nw ? sh[lane] : make_float2(0.f, 0.f);
  return warp_sum(s);
}

__device__ __forceinline__ float block_sum(float v, float2* sh) {
  return block_sum(make_float2(v, 0.f), sh).x;
}

// ---- flat-index helpers of the elementwise kernels ---------------------------------------------
// Grid-stride loop: this thread's first flat index, and the stride, in index type I.
template <typename I>
__device__ __forceinline__ I first_index() { return (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; }
template <typename I>
__device__ __forceinline__ I grid_stride() { return (I)gridDim.x * (I)blockDim.x; }

// idx = outer * n + inner, 0 <= inner < n: one division.
template <typename I>
struct IndexSplit {
  I outer, inner;
};
template <typename I>
__device__ __forceinline__ IndexSplit<I> split_index(I idx, I n) {
  const I q = idx / n;
  return {q, idx - q * n};
}

// ---- host-side launch helpers ----------------------------------------------------------------
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Multiprocessor count of the current device, cached per device (no synchronisation).
inline cudaError_t current_sm_count(int* out) {
  static std::atomic<int> cache[64];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev >= 0 && dev < 64) {
    int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) {
      *out = c;
      return cudaSuccess;
    }
  }
  int n = 0;
  e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  if (n < 1) n = 1;
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  *out = n;
  return cudaSuccess;
}

// Grid for a grid-stride loop over `work` items handled `per_block` at a time: enough
// blocks to fill the device (2048 resident threads per SM) and no more than needed.
inline unsigned grid_for(int64_t work, int64_t per_block, int threads, int sms) {
  const int64_t need = ceil_div(work, per_block);
  const int64_t resident = (int64_t)sms * max64(1, 2048 / threads);
  return (unsigned)max64(1, min64(need, resident));
}

inline bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }

}  // namespace gpu
}  // namespace vgmr

// Run `...` with `index_t` = int32_t when `narrow` (every offset fits), else uint64_t.
#define VGMR_GPU_INDEX_DISPATCH(narrow, ...) \
  if (narrow) {                              \
    using index_t = int32_t;                 \
    __VA_ARGS__;                             \
  } else {                                   \
    using index_t = uint64_t;                \
    __VA_ARGS__;                             \
  }

// Run `...` with `scalar_t` bound to the element type of `dtype`; unknown dtype: error code.
#define VGMR_GPU_DISPATCH(dtype, ...)                              \
  switch (dtype) {                                                 \
    case ::vgmr::gpu::DType::kFloat32: {                           \
      using scalar_t = float;                                      \
      __VA_ARGS__;                                                 \
    } break;                                                       \
    case ::vgmr::gpu::DType::kFloat16: {                           \
      using scalar_t = __half;                                     \
      __VA_ARGS__;                                                 \
    } break;                                                       \
    case ::vgmr::gpu::DType::kBFloat16: {                          \
      using scalar_t = __nv_bfloat16;                              \
      __VA_ARGS__;                                                 \
    } break;                                                       \
    default:                                                       \
      return cudaErrorInvalidValue;                                \
  }
