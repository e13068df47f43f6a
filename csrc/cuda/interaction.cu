// interaction (docs/math.md §2, docs/ops.md) on CUDA, raw pointers only.
//   forward : s [B, M, D] -> u [B, M, (3M-1) D], for target m and j1 < j2 < ... != m:
//             u[b, m] = [s_m; s_j...; s_m*s_j...; |s_m - s_j|...; mean_j s_j]
//   backward: du -> ds [B, M, D] (sign(0) = 0, as torch.abs)
//
// Forward: one thread per (b, m, c) writes all 3M-1 blocks of column c of u[b, m]
// (consecutive threads = consecutive c: every store is coalesced). Backward: one thread
// per (b, m, c) gathers every term that s[b, m, c] feeds, in a fixed order.
#include "cuda/common.cuh"

namespace vgmr {
namespace gpu {
namespace {

__device__ __forceinline__ float sgnf(float x) { return (float)((x > 0.f) - (x < 0.f)); }

template <typename T, typename I>
__global__ void __launch_bounds__(256)
    interaction_fwd_kernel(const T* __restrict__ s, T* __restrict__ u, I M, I D, I total) {
  const I W = (3 * M - 1) * D;  // width of one u[b, m] row
  const I stride = grid_stride<I>();
  for (I idx = first_index<I>(); idx < total; idx += stride) {
    const auto [bm, c] = split_index(idx, D);
    const auto [b, m] = split_index(bm, M);
    const T* __restrict__ sb = s + b * M * D + c;  // s[b, 0, c]
    T* __restrict__ ur = u + bm * W + c;            // u[b, m, block 0, c]
    const T sm_raw = sb[m * D];
    const float sm = to_f<T>(sm_raw);
    ur[0] = sm_raw;
    float ctx = 0.f;
    for (I j = 0; j < M; ++j) {
      if (j == m) continue;
      const I i = j < m ? j : j - 1;  // position of j among the others
      const T sj_raw = sb[j * D];
      const float sj = to_f<T>(sj_raw);
      ur[(1 + i) * D] = sj_raw;
      ur[(M + i) * D] = from_f<T>(sm * sj);
      ur[(2 * M - 1 + i) * D] = from_f<T>(fabsf(sm - sj));
      ctx += sj;
    }
    ur[(3 * M - 2) * D] = from_f<T>(ctx / (float)(M - 1));
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(256)
    interaction_bwd_kernel(const T* __restrict__ du, const T* __restrict__ s, T* __restrict__ ds, I M, I D,
                           I total) {
  const I W = (3 * M - 1) * D;
  const float inv_other = 1.0f / (float)(M - 1);
  const I stride = grid_stride<I>();
  for (I idx = first_index<I>(); idx < total; idx += stride) {
    const auto [bm, c] = split_index(idx, D);
    const auto [b, m] = split_index(bm, M);
    const T* __restrict__ sb = s + b * M * D + c;     // s[b, 0, c]
    const T* __restrict__ dub = du + b * M * W + c;   // du[b, 0, block 0, c]
    const T* __restrict__ dum = dub + m * W;          // du[b, m, block 0, c]
    const float sm = to_f<T>(sb[m * D]);
    float g = to_f<T>(dum[0]);  // u[m] block 0 is s_m itself
    for (I j = 0; j < M; ++j) {
      if (j == m) continue;
      const I i = j < m ? j : j - 1;   // j among the others of target m
      const I im = m < j ? m : m - 1;  // m among the others of target j
      const float sj = to_f<T>(sb[j * D]);
      const float sg = sgnf(sm - sj);
      const T* __restrict__ duj = dub + j * W;
      g += to_f<T>(dum[(M + i) * D]) * sj;           // s_m * s_j in u[m]
      g += to_f<T>(dum[(2 * M - 1 + i) * D]) * sg;   // |s_m - s_j| in u[m]
      g += to_f<T>(duj[(1 + im) * D]);               // s_m copied into u[j]
      g += to_f<T>(duj[(M + im) * D]) * sj;          // s_j * s_m in u[j]
      g += to_f<T>(duj[(2 * M - 1 + im) * D]) * sg;  // |s_j - s_m| in u[j]: d/ds_m = -sign(s_j - s_m)
      g += to_f<T>(duj[(3 * M - 2) * D]) * inv_other;  // s_m in the context mean of u[j]
    }
    ds[idx] = from_f<T>(g);
  }
}

// One thread per (b, m, c); 32-bit index math when every offset into u / du (the larger
// tensor, (3M-1) D per row) fits, grid stride included. total == 0: nothing to launch.
struct InteractionLaunch {
  int64_t total;
  unsigned grid;
  bool narrow;
};

cudaError_t plan_launch(int64_t B, int64_t M, int64_t D, InteractionLaunch* l) {
  if (B < 0 || M < 2 || D < 0) return cudaErrorInvalidValue;
  l->total = B * M * D;
  if (l->total == 0) return cudaSuccess;
  int sms = 0;
  cudaError_t e = current_sm_count(&sms);
  if (e != cudaSuccess) return e;
  l->grid = grid_for(l->total, 256, 256, sms);
  l->narrow = l->total * (3 * M - 1) + (int64_t)l->grid * 256 * (3 * M - 1) < (int64_t)INT32_MAX;
  return cudaSuccess;
}

}  // namespace

cudaError_t interaction_fwd_launch(DType dtype, const void* s, void* u, int64_t B, int64_t M, int64_t D,
                                   cudaStream_t stream) {
  InteractionLaunch l{};
  const cudaError_t e = plan_launch(B, M, D, &l);
  if (e != cudaSuccess || l.total == 0) return e;
  VGMR_GPU_INDEX_DISPATCH(l.narrow, VGMR_GPU_DISPATCH(dtype, interaction_fwd_kernel<scalar_t, index_t>
                                                      <<<l.grid, 256, 0, stream>>>(
                                                          static_cast<const scalar_t*>(s), static_cast<scalar_t*>(u),
                                                          (index_t)M, (index_t)D, (index_t)l.total)));
  return cudaGetLastError();
}

cudaError_t interaction_bwd_launch(DType dtype, const void* du, const void* s, void* ds, int64_t B, int64_t M,
                                   int64_t D, cudaStream_t stream) {
  InteractionLaunch l{};
  const cudaError_t e = plan_launch(B, M, D, &l);
  if (e != cudaSuccess || l.total == 0) return e;
  VGMR_GPU_INDEX_DISPATCH(l.narrow, VGMR_GPU_DISPATCH(dtype, interaction_bwd_kernel<scalar_t, index_t>
                                                      <<<l.grid, 256, 0, stream>>>(
                                                          static_cast<const scalar_t*>(du),
                                                          static_cast<const scalar_t*>(s), static_cast<scalar_t*>(ds),
                                                          (index_t)M, (index_t)D, (index_t)l.total)));
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace vgmr
