// summary_pool (docs/math.md §1, docs/ops.md) on CUDA, raw pointers only.
//   forward : h [B, T, D], mask [B, T] or null -> mean, max [B, D], argmax [B, D] int32
//   backward: dh[b,t,d] = mask[b,t] dmean[b,d] / max(1, n_b) + (t == argmax[b,d]) dmax[b,d]
//
// Forward: a block is 32 columns x up to 8 time slices of one batch row b; thread (x, y)
// walks t = y, y + ny, ... for column x (each warp reads 32 consecutive columns of one
// step: coalesced), then the ny partial (sum, count, max, argmax) are combined in shared
// memory in a fixed order (deterministic). Grid-stride over (b, column chunk) tiles.
// Backward: a small kernel turns the mask into max(1, n_b) per b, then one thread per
// element of dh.
#include "cuda/common.cuh"

namespace vgmr {
namespace gpu {
namespace {

constexpr int kPoolCols = 32;   // columns per block (one warp wide)
constexpr int kPoolSlices = 8;  // time slices per block (blockDim.y <= 8)

// Is (v, i) a better maximum than (best, bi)? Invalid candidates have index -1.
// NaN is maximal; among equal maxima (or NaNs) the smaller step index wins.
__device__ __forceinline__ bool better_max(float v, int i, float best, int bi) {
  if (i < 0) return false;
  if (bi < 0) return true;
  const bool vn = isnan(v), bn = isnan(best);
  if (bn) return vn && i < bi;
  if (vn) return true;
  return v > best || (v == best && i < bi);
}

template <typename T>
__global__ void __launch_bounds__(kPoolCols * kPoolSlices)
    summary_pool_fwd_kernel(const T* __restrict__ h, const uint8_t* __restrict__ mask, T* __restrict__ mean_out,
                            T* __restrict__ max_out, int32_t* __restrict__ arg_out, int64_t B, int64_t T_,
                            int64_t D) {
  __shared__ float s_sum[kPoolSlices][kPoolCols];
  __shared__ float s_max[kPoolSlices][kPoolCols];
  __shared__ int s_idx[kPoolSlices][kPoolCols];
  __shared__ int64_t s_cnt[kPoolSlices];
  const int tx = threadIdx.x, ty = threadIdx.y, ny = blockDim.y;
  const int64_t dchunks = ceil_div(D, kPoolCols);
  const int64_t ntiles = B * dchunks;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t b = tile / dchunks;
    const int64_t d = (tile - b * dchunks) * kPoolCols + tx;
    const bool col = d < D;
    const T* __restrict__ hb = h + b * T_ * D + (col ? d : 0);
    const uint8_t* __restrict__ mb = mask != nullptr ? mask + b * T_ : nullptr;
    float sum = 0.f, best = 0.f;
    int idx = -1;
    int64_t cnt = 0;
#pragma unroll 4
    for (int64_t t = ty; t < T_; t += ny) {
      if (mb != nullptr && mb[t] == 0) continue;
      ++cnt;
      if (col) {
        const float v = to_f<T>(hb[t * D]);
        sum += v;
        // strictly greater keeps the first maximal step; the first NaN wins and stays
        if (idx < 0 || v > best || (isnan(v) && !isnan(best))) {
          best = v;
          idx = (int)t;
        }
      }
    }
    s_sum[ty][tx] = sum;
    s_max[ty][tx] = best;
    s_idx[ty][tx] = idx;
    if (tx == 0) s_cnt[ty] = cnt;
    __syncthreads();
    if (ty == 0) {
      for (int y = 1; y < ny; ++y) {  // fixed order: deterministic
        sum += s_sum[y][tx];
        cnt += s_cnt[y];
        const float m2 = s_max[y][tx];
        const int i2 = s_idx[y][tx];
        if (better_max(m2, i2, best, idx)) {
          best = m2;
          idx = i2;
        }
      }
      if (col) {
        const int64_t o = b * D + d;
        if (cnt == 0) {
          mean_out[o] = from_f<T>(0.f);
          max_out[o] = from_f<T>(0.f);
          arg_out[o] = -1;
        } else {
          mean_out[o] = from_f<T>(sum / (float)cnt);
          max_out[o] = from_f<T>(best);
          arg_out[o] = idx;
        }
      }
    }
    __syncthreads();  // shared buffers are reused by the next tile
  }
}

// n[b] = max(1, number of valid steps of row b), as float. One block per b (grid-stride).
__global__ void __launch_bounds__(256)
    summary_pool_count_kernel(const uint8_t* __restrict__ mask, float* __restrict__ n_out, int64_t B, int64_t T_) {
  __shared__ long long red[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const uint8_t* __restrict__ mb = mask + b * T_;
    long long c = 0;
    for (int64_t t = threadIdx.x; t < T_; t += blockDim.x) c += mb[t] != 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
    __syncthreads();
    if (lane == 0) red[warp] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
      long long tot = 0;
      for (int w = 0; w < nw; ++w) tot += red[w];
      n_out[b] = tot < 1 ? 1.f : (float)tot;  // exact integer sum, rounded once
    }
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(256)
    summary_pool_bwd_kernel(const T* __restrict__ dmean, const T* __restrict__ dmax,
                            const uint8_t* __restrict__ mask, const int32_t* __restrict__ argmax,
                            const float* __restrict__ n_b, T* __restrict__ dh, I T_, I D, I total, float n_all) {
  const I stride = grid_stride<I>();
  for (I idx = first_index<I>(); idx < total; idx += stride) {
    const auto [r, d] = split_index(idx, D);
    const auto [b, t] = split_index(r, T_);
    const I bd = b * D + d;
    float g = 0.f;
    if (mask == nullptr) {
      g = to_f<T>(dmean[bd]) / n_all;
    } else if (mask[r] != 0) {
      g = to_f<T>(dmean[bd]) / n_b[b];
    }
    const int32_t a = argmax[bd];
    if (a >= 0 && (I)a == t) g += to_f<T>(dmax[bd]);
    dh[idx] = from_f<T>(g);
  }
}

}  // namespace

cudaError_t summary_pool_fwd_launch(DType dtype, const void* h, const uint8_t* mask, void* mean, void* max,
                                    int32_t* argmax, int64_t B, int64_t T, int64_t D, cudaStream_t stream) {
  if (B < 0 || T < 0 || D < 0 || T > INT32_MAX) return cudaErrorInvalidValue;
  if (B == 0 || D == 0) return cudaSuccess;
  int sms = 0;
  cudaError_t e = current_sm_count(&sms);
  if (e != cudaSuccess) return e;
  const int ny = (int)min64(kPoolSlices, max64(1, T));
  const dim3 block(kPoolCols, ny);
  const unsigned grid = grid_for(B * ceil_div(D, kPoolCols), 1, kPoolCols * ny, sms);
  VGMR_GPU_DISPATCH(dtype, summary_pool_fwd_kernel<scalar_t><<<grid, block, 0, stream>>>(
                               static_cast<const scalar_t*>(h), mask, static_cast<scalar_t*>(mean),
                               static_cast<scalar_t*>(max), argmax, B, T, D));
  return cudaGetLastError();
}

int64_t summary_pool_bwd_workspace_floats(int64_t B, bool has_mask) { return has_mask ? max64(B, 1) : 0; }

cudaError_t summary_pool_bwd_launch(DType dtype, const void* dmean, const void* dmax, const uint8_t* mask,
                                    const int32_t* argmax, void* dh, float* workspace, int64_t B, int64_t T,
                                    int64_t D, cudaStream_t stream) {
  if (B < 0 || T < 0 || D < 0 || T > INT32_MAX) return cudaErrorInvalidValue;
  if (mask != nullptr && workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t total = B * T * D;
  if (total == 0) return cudaSuccess;
  int sms = 0;
  cudaError_t e = current_sm_count(&sms);
  if (e != cudaSuccess) return e;
  if (mask != nullptr) {
    summary_pool_count_kernel<<<grid_for(B, 1, 256, sms), 256, 0, stream>>>(mask, workspace, B, T);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  const float n_all = (float)max64(1, T);
  const unsigned grid = grid_for(total, 256, 256, sms);
  // 32-bit index math when every offset (and idx + grid stride) fits
  VGMR_GPU_INDEX_DISPATCH(total + (int64_t)grid * 256 < (int64_t)INT32_MAX,
                          VGMR_GPU_DISPATCH(dtype, summary_pool_bwd_kernel<scalar_t, index_t>
                                            <<<grid, 256, 0, stream>>>(
                                                static_cast<const scalar_t*>(dmean), static_cast<const scalar_t*>(dmax),
                                                mask, argmax, workspace, static_cast<scalar_t*>(dh), (index_t)T,
                                                (index_t)D, (index_t)total, n_all)));
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace vgmr
