// gate_norm (docs/math.md §5, docs/ops.md) on CUDA, raw pointers only.
//   forward : z = zpre + bias_row[b]; G = sigmoid(z); Geff = beta + (1-beta)(1 + alpha(2G-1));
//             v = Geff x; y = Dropout(LayerNorm_D(v) * w + b); saves mean, rstd [B, T] (fp32)
//   row statistics (docs/ops.md): shift K = v[0], mean_s = mean(v - K), var = mean((v - K -
//             mean_s)^2), vhat = ((v - K) - mean_s) rstd; saved mean = K + mean_s
//   backward: recomputes G, Geff, K, mean_s, vhat and the keep mask; dzpre, dx [B, T, D] (dtype),
//             dbias_row [B, D], dln_weight, dln_bias [D] (fp32, deterministic)
//
// Two code paths per direction, chosen on the host:
//   - "vec" (D % VEC == 0, 16-byte aligned pointers, D <= 8192 forward / 4096 backward):
//     the row lives in registers, 16-byte loads/stores (VEC = 4 fp32 or 8 half elements),
//     one warp per row for D <= 256 (warp shuffles only), else one block per row
//     (warp shuffles + one shared-memory exchange per reduction). Each thread owns the
//     same columns on every row it visits: the forward keeps ln_weight / ln_bias in
//     registers; the backward keeps its dbias_row partial in registers and its
//     dln_weight / dln_bias partials in shared memory (own columns, no barrier), and in
//     block mode prefetches the next row before the block-wide reduction.
//   - "generic" (any D, any alignment): one block per row, columns in groups of 4 (one
//     Philox call per group); the forward caches v in shared memory when it fits, the
//     backward recomputes and accumulates its partial columns in its own global rows.
// Work is grid-strided (persistent workers). Backward work unit = a tile of rows
// (b, t0 .. t0+tc) of one batch row: its dbias_row partial goes straight to dbias_row
// when T is not split (nsplit == 1), else to a [B * nsplit, D] partial buffer. Every
// worker block writes one [D] partial row of dln_weight and of dln_bias; a second kernel
// sums partial rows in a fixed order. No float atomics: run-to-run bitwise identical on
// one device (the worker count follows the SM count and the kernel's occupancy; >= 32
// rows per worker once the device is full, so partials stay a few % of the traffic).
// Dropout: the shared Philox stream of csrc/vgmr_math.h, one philox4x32_10 call per 4
// consecutive columns (word c % 4), row index r = b T + t.
#include <mutex>
#include <vector>

#include "cuda/common.cuh"

namespace vgmr {
namespace gpu {
namespace {

constexpr float kEps = 1e-5f;
constexpr int kMaxThreads = 512;     // launch bound of the row kernels
constexpr int kWarpRowsPerBlock = 4;  // warp-per-row kernels: 4 warps (rows) per block
constexpr int kVecBwdMaxD = 4096;
constexpr int kVecFwdMaxD = 8192;

// The gate and dropout scalars of both directions.
struct GateArgs {
  float alpha, beta;
  uint32_t thr;
  float scale;
  const int64_t* __restrict__ seed;  // device pointer, read when dropout
  bool dropout;
};

// ... and the inputs of both directions.
template <typename S>
struct GateInputs : GateArgs {
  const S* __restrict__ zpre;
  const float* __restrict__ bias_row;
  const S* __restrict__ x;
  const float* __restrict__ w;
};

template <typename S>
struct FwdArgs : GateInputs<S> {
  const float* __restrict__ b;
  S* __restrict__ y;
  float* __restrict__ mean;
  float* __restrict__ rstd;
  int64_t R, T, D;
};

template <typename S>
struct BwdArgs : GateInputs<S> {
  const S* __restrict__ dy;
  const float* __restrict__ rstd;  // the kernels recompute the row shift and mean_s themselves
  S* __restrict__ dzpre;
  S* __restrict__ dx;  // null: no input gradient asked for, never written
  float* __restrict__ dbias;   // dbias_row (nsplit == 1) or [B * nsplit, D] partials
  float* __restrict__ part_w;  // [gridDim.x, D]
  float* __restrict__ part_b;  // [gridDim.x, D]
  int64_t B, T, D, nsplit, tc;
};

// Sum over the row team (V = float or float2).
template <bool WARP, typename V>
__device__ __forceinline__ V row_sum(V v, float2* red) {
  if constexpr (WARP) {
    return warp_sum(v);
  } else {
    return block_sum(v, red);
  }
}

// Broadcast a value of the row team's first thread (lane 0 of the warp, or thread 0 of the
// block) to the team: the row shift K = v[0] of the row statistics. Block mode: the leading
// barrier lets the previous reduction's readers of `red` finish; the next reduction's leading
// barrier lets every thread read the value before `red` is rewritten.
template <bool WARP>
__device__ __forceinline__ float row_first(float x, float2* red) {
  if constexpr (WARP) {
    return __shfl_sync(0xffffffffu, x, 0);
  } else {
    __syncthreads();
    if (threadIdx.x == 0) red[0].x = x;
    __syncthreads();
    return red[0].x;
  }
}

// v = Geff * x, rounded once and never contracted into an FMA with what follows: the
// backward recomputes (v - K) - mean_s and must get the forward's bits (an FMA there would
// shift vhat by an ulp of v, which rstd amplifies; e.g. D = 1, where v - K is exactly 0).
__device__ __forceinline__ float gated(float geff, float x) { return __fmul_rn(geff, x); }

// Keep factors (scale or 0) of the 4 columns c0 .. c0+3 (c0 % 4 == 0) of row r. The Philox
// key is the int64 at `seed`, read from device memory (never by the host, so a replayed CUDA
// graph sees the seed tensor's current value) at each use: an L1 hit, and no two registers
// held across the row loop (the bf16 warp backward would spill them).
__device__ __forceinline__ void keep4(const int64_t* __restrict__ seed, int64_t r, int64_t c0, int64_t D,
                                      uint32_t thr, float scale, float (&kf)[4]) {
  const U32x4 wd = philox4x32_10((uint64_t)__ldg(seed), philox_counter(r, c0, D));
#pragma unroll
  for (int j = 0; j < 4; ++j) kf[j] = dropout_keep(wd.w[j], thr) ? scale : 0.f;
}

// Vec path: scale the VEC values of columns c0 .. c0+VEC-1 (c0 % 4 == 0) of row r by their
// keep factors.
template <int VEC>
__device__ __forceinline__ void apply_keep(const GateArgs& a, int64_t r, int64_t c0, int64_t D, float (&v)[VEC]) {
#pragma unroll
  for (int g = 0; g < VEC / 4; ++g) {
    float kf[4];
    keep4(a.seed, r, c0 + 4 * g, D, a.thr, a.scale, kf);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[4 * g + j] *= kf[j];
  }
}

// Generic path: f(c, keep factor) for this thread's columns c of row r, in groups of 4
// (g = threadIdx.x + k * blockDim.x, one Philox call per group when `dropout`; else the
// factor is 1), columns ascending within a group.
template <typename F>
__device__ __forceinline__ void for_each_column(const GateArgs& a, int64_t r, int64_t D, bool dropout, F&& f) {
  const int64_t ngroups = ceil_div(D, 4);
  for (int64_t g = threadIdx.x; g < ngroups; g += blockDim.x) {
    float kf[4] = {1.f, 1.f, 1.f, 1.f};
    if (dropout) keep4(a.seed, r, 4 * g, D, a.thr, a.scale, kf);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = 4 * g + j;
      if (c < D) f(c, kf[j]);
    }
  }
}

// ---- vec path --------------------------------------------------------------------------------
// Thread `lane` of a row team of `tpr` threads owns vectors i = lane + k * tpr (k < NV)
// of VEC elements: consecutive lanes touch consecutive 16-byte chunks (coalesced).
template <typename T, int E, bool WARP>
__global__ void __launch_bounds__(kMaxThreads) gn_fwd_vec(FwdArgs<T> a) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int NV = E / VEC;
  static_assert(NV >= 1 && NV * VEC == E, "E must be a multiple of the vector width");
  __shared__ float2 red[32];
  const int lane = WARP ? (int)(threadIdx.x & 31) : (int)threadIdx.x;
  const int tpr = WARP ? 32 : (int)blockDim.x;
  const int64_t worker = WARP ? (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5) : (int64_t)blockIdx.x;
  const int64_t nworkers = WARP ? (int64_t)gridDim.x * (blockDim.x >> 5) : (int64_t)gridDim.x;
  const int D = (int)a.D;
  const int nvec = D / VEC;
  const float invD = 1.0f / (float)D;

  float wr[NV][VEC], br[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = lane + k * tpr;
    if (i < nvec) {
      load_pack<float, VEC>(a.w + i * VEC, wr[k]);
      load_pack<float, VEC>(a.b + i * VEC, br[k]);
    }
  }

  for (int64_t r = worker; r < a.R; r += nworkers) {
    const int64_t bi = r / a.T;
    const T* __restrict__ zr = a.zpre + r * D;
    const T* __restrict__ xr = a.x + r * D;
    const float* __restrict__ bsr = a.bias_row + bi * D;
    float v[NV][VEC];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = lane + k * tpr;
      if (i < nvec) {
        float z[VEC], xx[VEC], bs[VEC];
        load_pack<T, VEC>(zr + i * VEC, z);
        load_pack<T, VEC>(xr + i * VEC, xx);
        load_pack<float, VEC>(bsr + i * VEC, bs);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[k][j] = gated(gate_eff(sigmoidf_(z[j] + bs[j]), a.alpha, a.beta), xx[j]);
      }
    }
    // row statistics (docs/ops.md): shift K = v[0] (lane 0's first element), two passes
    const float K = row_first<WARP>(v[0][0], red);
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (lane + k * tpr < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += v[k][j] - K;
      }
    }
    const float ms = row_sum<WARP>(s, red) * invD;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (lane + k * tpr < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float dlt = (v[k][j] - K) - ms;
          q += dlt * dlt;
        }
      }
    }
    const float var = row_sum<WARP>(q, red) * invD;
    const float rs = ln_rstd<float>(var, kEps);
    T* __restrict__ yr = a.y + r * D;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = lane + k * tpr;
      if (i < nvec) {
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = (((v[k][j] - K) - ms) * rs) * wr[k][j] + br[k][j];
        if (a.dropout) apply_keep<VEC>(a, r, (int64_t)i * VEC, D, o);
        store_pack<T, VEC>(yr + i * VEC, o);
      }
    }
    if (lane == 0) {
      a.mean[r] = K + ms;
      a.rstd[r] = rs;
    }
  }
}

template <typename T, int VEC, int NV>
__device__ __forceinline__ void load_raw_row(const BwdArgs<T>& a, int64_t off, int lane, int tpr, int nvec,
                                             Pack<T, VEC> (&rdy)[NV], Pack<T, VEC> (&rz)[NV],
                                             Pack<T, VEC> (&rx)[NV]) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = lane + k * tpr;
    if (i < nvec) {
      const int64_t o = off + (int64_t)i * VEC;
      rdy[k] = *reinterpret_cast<const Pack<T, VEC>*>(a.dy + o);
      rz[k] = *reinterpret_cast<const Pack<T, VEC>*>(a.zpre + o);
      rx[k] = *reinterpret_cast<const Pack<T, VEC>*>(a.x + o);
    }
  }
}

// Backward, vec path. Each row team (warp or block) keeps its dln_weight / dln_bias
// partial sums in shared memory (a thread read-modify-writes only its own columns; no
// barrier), which leaves the registers for the row itself. Block mode prefetches the next
// row's dy / zpre / x before the block-wide reduction: at D = 4096 one 512-thread block
// per SM would otherwise idle on memory at every row. At the end the warps' partials of a
// block are summed in a fixed order into this block's partial row.
template <typename T, int E, bool WARP>
__global__ void __launch_bounds__(kMaxThreads) gn_bwd_vec(BwdArgs<T> a) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int NV = E / VEC;
  static_assert(NV >= 1 && NV * VEC == E, "E must be a multiple of the vector width");
  using Raw = Pack<T, VEC>;  // 16 bytes
  __shared__ float2 red[32];
  extern __shared__ float4 dyn_smem[];  // [teams per block][2][D]: dln_weight, dln_bias partials
  const int lane = WARP ? (int)(threadIdx.x & 31) : (int)threadIdx.x;
  const int tpr = WARP ? 32 : (int)blockDim.x;
  const int team = WARP ? (int)(threadIdx.x >> 5) : 0;
  const int nteams = WARP ? (int)(blockDim.x >> 5) : 1;
  const int64_t worker = (int64_t)blockIdx.x * nteams + team;
  const int64_t nworkers = (int64_t)gridDim.x * nteams;
  const int D = (int)a.D;
  const int nvec = D / VEC;
  const float invD = 1.0f / (float)D;
  float* __restrict__ acc_w = reinterpret_cast<float*>(dyn_smem) + (int64_t)team * 2 * D;
  float* __restrict__ acc_b = acc_w + D;

  {
    float zero[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) zero[j] = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = lane + k * tpr;
      if (i < nvec) {
        store_pack<float, VEC>(acc_w + i * VEC, zero);
        store_pack<float, VEC>(acc_b + i * VEC, zero);
      }
    }
  }

  const int64_t ntiles = a.B * a.nsplit;
  for (int64_t tile = worker; tile < ntiles; tile += nworkers) {
    const int64_t bi = tile / a.nsplit;
    const int64_t t0 = (tile - bi * a.nsplit) * a.tc;
    const int64_t t1 = min64(a.T, t0 + a.tc);
    const float* __restrict__ bsr = a.bias_row + bi * D;
    float adz[NV][VEC];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) adz[k][j] = 0.f;
    }
    Raw rdy[NV], rz[NV], rx[NV];  // raw inputs of the current row
    if constexpr (!WARP) load_raw_row<T, VEC, NV>(a, (bi * a.T + t0) * D, lane, tpr, nvec, rdy, rz, rx);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = bi * a.T + t;
      const int64_t off = r * D;
      if constexpr (WARP) load_raw_row<T, VEC, NV>(a, off, lane, tpr, nvec, rdy, rz, rx);
      const float rs = a.rstd[r];
      float G[NV][VEC], xv[NV][VEC], dvh[NV][VEC];
      // the gate, then the forward's row shift K = v[0] and shifted mean, recomputed from the
      // row (the saved mean K + mean_s does not give mean_s back bit for bit)
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int i = lane + k * tpr;
        if (i < nvec) {
          float z[VEC], bs[VEC];
          unpack<T, VEC>(rz[k], z);
          unpack<T, VEC>(rx[k], xv[k]);
          load_pack<float, VEC>(bsr + i * VEC, bs);
#pragma unroll
          for (int j = 0; j < VEC; ++j) G[k][j] = sigmoidf_(z[j] + bs[j]);
        }
      }
      const float K = row_first<WARP>(gated(gate_eff(G[0][0], a.alpha, a.beta), xv[0][0]), red);
      float s0 = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (lane + k * tpr < nvec) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) s0 += gated(gate_eff(G[k][j], a.alpha, a.beta), xv[k][j]) - K;
        }
      }
      const float ms = row_sum<WARP>(s0, red) * invD;
      float s1 = 0.f, s2 = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int i = lane + k * tpr;
        if (i < nvec) {
          float dyv[VEC];
          unpack<T, VEC>(rdy[k], dyv);
          if (a.dropout) apply_keep<VEC>(a, r, (int64_t)i * VEC, D, dyv);
          // ln_weight and this batch row's bias_row: re-read per row (L1/L2 hits), not
          // held in registers across rows
          float wv[VEC], cw[VEC], cb[VEC];
          load_pack<float, VEC>(a.w + i * VEC, wv);
          load_pack<float, VEC>(acc_w + i * VEC, cw);
          load_pack<float, VEC>(acc_b + i * VEC, cb);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float vh = ((gated(gate_eff(G[k][j], a.alpha, a.beta), xv[k][j]) - K) - ms) * rs;
            cb[j] += dyv[j];
            cw[j] += dyv[j] * vh;
            const float d = dyv[j] * wv[j];
            dvh[k][j] = d;
            s1 += d;
            s2 += d * vh;
          }
          store_pack<float, VEC>(acc_w + i * VEC, cw);
          store_pack<float, VEC>(acc_b + i * VEC, cb);
        }
      }
      if constexpr (!WARP) {  // prefetch the next row of this tile, then reduce
        if (t + 1 < t1) load_raw_row<T, VEC, NV>(a, off + D, lane, tpr, nvec, rdy, rz, rx);
      }
      const float2 sums = row_sum<WARP>(make_float2(s1, s2), red);
      const float ma = sums.x * invD, mc = sums.y * invD;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int i = lane + k * tpr;
        if (i < nvec) {
          float dxo[VEC], dzo[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float g = G[k][j];
            const float ge = gate_eff(g, a.alpha, a.beta);
            const float vh = ((gated(ge, xv[k][j]) - K) - ms) * rs;
            const float dv = ln_bwd_dv<float>(dvh[k][j], vh, ma, mc, rs);
            dxo[j] = dv * ge;
            dzo[j] = dv * xv[k][j] * gate_eff_grad(g, a.alpha, a.beta);
            adz[k][j] += dzo[j];
          }
          if (a.dx != nullptr) store_pack<T, VEC>(a.dx + off + i * VEC, dxo);
          store_pack<T, VEC>(a.dzpre + off + i * VEC, dzo);
        }
      }
    }
    float* __restrict__ dst = a.dbias + (a.nsplit == 1 ? bi : tile) * D;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = lane + k * tpr;
      if (i < nvec) store_pack<float, VEC>(dst + i * VEC, adz[k]);
    }
  }

  // This block's dln_weight / dln_bias partial rows: teams summed in a fixed order.
  __syncthreads();
  const float* __restrict__ accs = reinterpret_cast<const float*>(dyn_smem);
  float* __restrict__ pw = a.part_w + (int64_t)blockIdx.x * D;
  float* __restrict__ pb = a.part_b + (int64_t)blockIdx.x * D;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float sw = 0.f, sb = 0.f;
    for (int w = 0; w < nteams; ++w) {
      sw += accs[(int64_t)w * 2 * D + c];
      sb += accs[(int64_t)w * 2 * D + D + c];
    }
    pw[c] = sw;
    pb[c] = sb;
  }
}

// ---- generic path (any D, any alignment) -------------------------------------------------
template <typename T>
__device__ __forceinline__ float gn_v(const FwdArgs<T>& a, const T* __restrict__ zr, const T* __restrict__ xr,
                                      const float* __restrict__ bsr, int64_t c) {
  return gated(gate_eff(sigmoidf_(to_f<T>(zr[c]) + bsr[c]), a.alpha, a.beta), to_f<T>(xr[c]));
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) gn_fwd_generic(FwdArgs<T> a, int cache) {
  extern __shared__ float vc[];  // [D] when cache
  __shared__ float2 red[32];
  const int64_t D = a.D;
  const float invD = 1.0f / (float)D;
  for (int64_t r = blockIdx.x; r < a.R; r += gridDim.x) {
    const int64_t bi = r / a.T;
    const T* __restrict__ zr = a.zpre + r * D;
    const T* __restrict__ xr = a.x + r * D;
    const float* __restrict__ bsr = a.bias_row + bi * D;
    // row statistics (docs/ops.md): shift K = v[0], then two passes over v - K
    const float K = row_first<false>(threadIdx.x == 0 ? gn_v(a, zr, xr, bsr, 0) : 0.f, red);
    float s = 0.f;
    for_each_column(a, r, D, false, [&](int64_t c, float) {
      const float v = gn_v(a, zr, xr, bsr, c);
      if (cache) vc[c] = v;
      s += v - K;
    });
    const float ms = block_sum(s, red) * invD;
    float q = 0.f;
    for_each_column(a, r, D, false, [&](int64_t c, float) {
      const float dlt = ((cache ? vc[c] : gn_v(a, zr, xr, bsr, c)) - K) - ms;
      q += dlt * dlt;
    });
    const float var = block_sum(q, red) * invD;
    const float rs = ln_rstd<float>(var, kEps);
    T* __restrict__ yr = a.y + r * D;
    for_each_column(a, r, D, a.dropout, [&](int64_t c, float kf) {
      const float v = cache ? vc[c] : gn_v(a, zr, xr, bsr, c);
      float o = (((v - K) - ms) * rs) * a.w[c] + a.b[c];
      if (a.dropout) o *= kf;
      yr[c] = from_f<T>(o);
    });
    if (threadIdx.x == 0) {
      a.mean[r] = K + ms;
      a.rstd[r] = rs;
    }
  }
}

// Everything the backward needs of element c of row r: G, vhat and the (dropout-masked) dy.
struct BwdElem {
  float g, xv, vh, gy;
};

// v = Geff x of element c, as the forward computed it (gn_v).
template <typename T>
__device__ __forceinline__ float gn_bwd_v(const BwdArgs<T>& a, int64_t off, const float* __restrict__ bsr,
                                          int64_t c) {
  return gated(gate_eff(sigmoidf_(to_f<T>(a.zpre[off + c]) + bsr[c]), a.alpha, a.beta), to_f<T>(a.x[off + c]));
}

template <typename T>
__device__ __forceinline__ BwdElem gn_bwd_elem(const BwdArgs<T>& a, int64_t off, const float* __restrict__ bsr,
                                               int64_t c, float K, float ms, float rs, float kf) {
  BwdElem e;
  e.g = sigmoidf_(to_f<T>(a.zpre[off + c]) + bsr[c]);
  e.xv = to_f<T>(a.x[off + c]);
  e.vh = ((gated(gate_eff(e.g, a.alpha, a.beta), e.xv) - K) - ms) * rs;
  e.gy = to_f<T>(a.dy[off + c]);
  if (a.dropout) e.gy *= kf;
  return e;
}

// Each thread owns the column groups g = threadIdx.x + k * blockDim.x on every row, so it
// accumulates its dln_weight / dln_bias / dbias_row partial columns in global memory
// (this block's partial rows: L2-resident read-modify-write, no races, no atomics).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads) gn_bwd_generic(BwdArgs<T> a) {
  __shared__ float2 red[32];
  const int64_t D = a.D;
  const float invD = 1.0f / (float)D;
  float* __restrict__ pw = a.part_w + (int64_t)blockIdx.x * D;
  float* __restrict__ pb = a.part_b + (int64_t)blockIdx.x * D;
  for (int64_t c = threadIdx.x * 4; c < D; c += (int64_t)blockDim.x * 4) {
    for (int j = 0; j < 4 && c + j < D; ++j) pw[c + j] = pb[c + j] = 0.f;
  }
  const int64_t ntiles = a.B * a.nsplit;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t bi = tile / a.nsplit;
    const int64_t t0 = (tile - bi * a.nsplit) * a.tc;
    const int64_t t1 = min64(a.T, t0 + a.tc);
    const float* __restrict__ bsr = a.bias_row + bi * D;
    float* __restrict__ dbz = a.dbias + (a.nsplit == 1 ? bi : tile) * D;
    for (int64_t c = threadIdx.x * 4; c < D; c += (int64_t)blockDim.x * 4) {
      for (int j = 0; j < 4 && c + j < D; ++j) dbz[c + j] = 0.f;
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = bi * a.T + t;
      const int64_t off = r * D;
      const float rs = a.rstd[r];
      // the forward's row shift K = v[0] and shifted mean, recomputed from the row
      const float K = row_first<false>(threadIdx.x == 0 ? gn_bwd_v(a, off, bsr, 0) : 0.f, red);
      float s0 = 0.f;
      for_each_column(a, r, D, false, [&](int64_t c, float) { s0 += gn_bwd_v(a, off, bsr, c) - K; });
      const float ms = block_sum(s0, red) * invD;
      float s1 = 0.f, s2 = 0.f;
      for_each_column(a, r, D, a.dropout, [&](int64_t c, float kf) {
        const BwdElem e = gn_bwd_elem(a, off, bsr, c, K, ms, rs, kf);
        pb[c] += e.gy;
        pw[c] += e.gy * e.vh;
        const float d = e.gy * a.w[c];
        s1 += d;
        s2 += d * e.vh;
      });
      const float2 sums = block_sum(make_float2(s1, s2), red);
      const float ma = sums.x * invD, mc = sums.y * invD;
      for_each_column(a, r, D, a.dropout, [&](int64_t c, float kf) {
        const BwdElem e = gn_bwd_elem(a, off, bsr, c, K, ms, rs, kf);
        const float dv = ln_bwd_dv<float>(e.gy * a.w[c], e.vh, ma, mc, rs);
        const float dz = dv * e.xv * gate_eff_grad(e.g, a.alpha, a.beta);
        if (a.dx != nullptr) a.dx[off + c] = from_f<T>(dv * gate_eff(e.g, a.alpha, a.beta));
        a.dzpre[off + c] = from_f<T>(dz);
        dbz[c] += dz;
      });
    }
  }
}

// out[bt, c] = sum_k part[bt * nrows + k, c] for bt < nbatch, c < D, k ascending in 8
// interleaved slices combined in a fixed order (deterministic).
__global__ void __launch_bounds__(256)
    reduce_partials_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t nbatch, int64_t nrows,
                           int64_t D) {
  __shared__ float sh[8][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t dchunks = ceil_div(D, 32);
  const int64_t ntiles = nbatch * dchunks;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t bt = tile / dchunks;
    const int64_t c = (tile - bt * dchunks) * 32 + tx;
    float s = 0.f;
    if (c < D) {
      const float* __restrict__ p = part + bt * nrows * D + c;
      for (int64_t k = ty; k < nrows; k += 8) s += p[k * D];
    }
    sh[ty][tx] = s;
    __syncthreads();
    if (ty == 0) {
      for (int y = 1; y < 8; ++y) s += sh[y][tx];
      if (c < D) out[bt * D + c] = s;
    }
    __syncthreads();
  }
}

// ---- host side: plans -----------------------------------------------------------------------
int vec_width(DType dt) { return dt == DType::kFloat32 ? 4 : 8; }

int round_up32(int64_t n) { return (int)(ceil_div(max64(n, 1), 32) * 32); }

// Threads for a block-per-row kernel over `units` per row, at most kMaxThreads, balanced so
// every thread does the same number of rounds.
int balanced_threads(int64_t units) {
  const int64_t rounds = ceil_div(max64(units, 1), kMaxThreads);
  return round_up32(ceil_div(max64(units, 1), rounds));
}

enum class Path { kWarp, kBlock, kGeneric };

struct FwdPlan {
  Path path;
  int elems;    // elements per thread (vec paths): 8, or 16 for 4096 < D <= 8192
  int threads;  // per block
  unsigned grid;
  size_t smem;
  int cache;  // generic: v cached in shared memory
};

FwdPlan plan_fwd(DType dt, int64_t R, int64_t D, bool vec_ok, int sms) {
  FwdPlan p{};
  const int VEC = vec_width(dt);
  if (vec_ok && D % VEC == 0 && D <= kVecFwdMaxD) {
    if (D <= 32 * 8) {
      p.path = Path::kWarp;
      p.elems = 8;
      p.threads = 32 * kWarpRowsPerBlock;
      p.grid = grid_for(R, kWarpRowsPerBlock, p.threads, sms);
    } else {
      p.path = Path::kBlock;
      p.elems = D <= (int64_t)kMaxThreads * 8 ? 8 : 16;
      p.threads = round_up32(ceil_div(D, p.elems));
      p.grid = grid_for(R, 1, p.threads, sms);
    }
    return p;
  }
  p.path = Path::kGeneric;
  p.threads = balanced_threads(ceil_div(D, 4));
  p.grid = grid_for(R, 1, p.threads, sms);
  // v cached in dynamic shared memory when it fits the default 48 KiB (static smem included)
  p.cache = D * (int64_t)sizeof(float) <= 40 * 1024 ? 1 : 0;
  p.smem = p.cache ? (size_t)D * sizeof(float) : 0;
  return p;
}

struct BwdPlan {
  Path path;
  int threads;
  unsigned grid;  // blocks; partial rows of dln_weight / dln_bias
  int64_t nsplit, tc;
  size_t smem;
  int64_t ws_floats;  // 2 * grid * D (+ B * nsplit * D when nsplit > 1)
};

constexpr int64_t kMinRowsPerWorker = 32;  // partial rows stay a few % of the traffic

// Resident blocks per SM of `kernel` (registers, shared memory, threads), cached per
// (kernel, threads, smem, device). A host-side query: no synchronisation, graph-safe.
template <typename K>
int blocks_per_sm(K kernel, int threads, size_t smem) {
  struct Entry {
    const void* k;
    int threads;
    size_t smem;
    int dev;
    int n;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
  const void* kp = reinterpret_cast<const void*>(kernel);
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const Entry& e : cache) {
      if (e.k == kp && e.threads == threads && e.smem == smem && e.dev == dev) return e.n;
    }
  }
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();  // the query failed: fall back to the thread limit
    n = (int)max64(1, 2048 / threads);
  }
  std::lock_guard<std::mutex> lock(mu);
  cache.push_back(Entry{kp, threads, smem, dev, n});
  return n;
}

// vec: the 8-elements-per-thread register kernels (D % VEC == 0, D <= 4096, aligned).
template <typename T>
BwdPlan plan_bwd(int64_t B, int64_t T_, int64_t D, bool vec, int sms) {
  BwdPlan p{};
  int wpb = 1;  // workers (row teams) per block
  int occ = 1;  // resident blocks per SM
  if (vec && D <= 32 * 8) {
    p.path = Path::kWarp;
    wpb = kWarpRowsPerBlock;
    p.threads = 32 * kWarpRowsPerBlock;
    p.smem = (size_t)kWarpRowsPerBlock * 2 * D * sizeof(float);
    occ = blocks_per_sm(gn_bwd_vec<T, 8, true>, p.threads, p.smem);
  } else if (vec) {
    p.path = Path::kBlock;
    p.threads = round_up32(ceil_div(D, 8));
    p.smem = 2 * (size_t)D * sizeof(float);
    occ = blocks_per_sm(gn_bwd_vec<T, 8, false>, p.threads, p.smem);
  } else {
    p.path = Path::kGeneric;
    p.threads = balanced_threads(ceil_div(D, 4));
    occ = blocks_per_sm(gn_bwd_generic<T>, p.threads, 0);
  }
  const int64_t R = B * T_;
  const int64_t resident = (int64_t)sms * occ * wpb;  // workers that run at once
  // Fill the device, but give each worker >= kMinRowsPerWorker rows once it is full: every
  // block writes (and the second kernel reads) 2 partial rows of D floats, and every tile of
  // a split T one more. At least one block per SM either way.
  const int64_t target = max64(1, min64(resident, max64(ceil_div(R, kMinRowsPerWorker), (int64_t)sms * wpb)));
  if (B >= target) {
    p.nsplit = 1;
  } else {
    p.nsplit = min64(T_, ceil_div(target, B));
  }
  p.tc = max64(ceil_div(T_, max64(p.nsplit, 1)), min64(T_, kMinRowsPerWorker));
  p.tc = max64(p.tc, 1);
  p.nsplit = max64(1, ceil_div(T_, p.tc));
  const int64_t ntiles = B * p.nsplit;
  const int64_t workers = max64(1, min64(target, ntiles));
  p.grid = (unsigned)ceil_div(workers, wpb);
  p.ws_floats = 2 * (int64_t)p.grid * D + (p.nsplit > 1 ? B * p.nsplit * D : 0);
  return p;
}

bool vec_bwd_possible(DType dt, int64_t D) { return D % vec_width(dt) == 0 && D <= kVecBwdMaxD; }

template <typename T>
cudaError_t launch_fwd(const FwdPlan& p, const FwdArgs<T>& a, cudaStream_t st) {
  switch (p.path) {
    case Path::kWarp:
      gn_fwd_vec<T, 8, true><<<p.grid, p.threads, 0, st>>>(a);
      break;
    case Path::kBlock:
      if (p.elems == 8) gn_fwd_vec<T, 8, false><<<p.grid, p.threads, 0, st>>>(a);
      else gn_fwd_vec<T, 16, false><<<p.grid, p.threads, 0, st>>>(a);
      break;
    case Path::kGeneric:
      gn_fwd_generic<T><<<p.grid, p.threads, p.smem, st>>>(a, p.cache);
      break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const BwdPlan& p, const BwdArgs<T>& a, cudaStream_t st) {
  switch (p.path) {
    case Path::kWarp:
      gn_bwd_vec<T, 8, true><<<p.grid, p.threads, p.smem, st>>>(a);
      break;
    case Path::kBlock:
      gn_bwd_vec<T, 8, false><<<p.grid, p.threads, p.smem, st>>>(a);
      break;
    case Path::kGeneric:
      gn_bwd_generic<T><<<p.grid, p.threads, 0, st>>>(a);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_reduce(const float* part, float* out, int64_t nbatch, int64_t nrows, int64_t D, int sms,
                          cudaStream_t st) {
  const unsigned grid = grid_for(nbatch * ceil_div(D, 32), 1, 256, sms);
  reduce_partials_kernel<<<grid, dim3(32, 8), 0, st>>>(part, out, nbatch, nrows, D);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gate_norm_fwd_launch(DType dtype, const void* zpre, const float* bias_row, const void* x,
                                 const float* w, const float* b, void* y, float* mean, float* rstd, int64_t B,
                                 int64_t T, int64_t D, float alpha, float beta, uint32_t keep_threshold,
                                 float keep_scale, const int64_t* seed, bool dropout, cudaStream_t stream) {
  if (B < 0 || T < 0 || D < 1) return cudaErrorInvalidValue;
  const int64_t R = B * T;
  if (R == 0) return cudaSuccess;
  int sms = 0;
  cudaError_t e = current_sm_count(&sms);
  if (e != cudaSuccess) return e;
  const bool aligned = aligned16(zpre) && aligned16(x) && aligned16(y) && aligned16(bias_row) && aligned16(w) &&
                       aligned16(b);
  const FwdPlan p = plan_fwd(dtype, R, D, aligned, sms);
  VGMR_GPU_DISPATCH(dtype, {
    const GateInputs<scalar_t> in{{alpha, beta, keep_threshold, keep_scale, seed, dropout},
                                  static_cast<const scalar_t*>(zpre), bias_row, static_cast<const scalar_t*>(x), w};
    const FwdArgs<scalar_t> a{in, b, static_cast<scalar_t*>(y), mean, rstd, R, T, D};
    return launch_fwd<scalar_t>(p, a, stream);
  });
  return cudaSuccess;
}

int64_t gate_norm_bwd_workspace_floats(DType dtype, int64_t B, int64_t T, int64_t D) {
  if (B <= 0 || T <= 0 || D <= 0) return 0;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16) return 0;
  int sms = 0;
  if (current_sm_count(&sms) != cudaSuccess) sms = 1;
  int64_t ws = 0;
  VGMR_GPU_DISPATCH(dtype, {
    ws = plan_bwd<scalar_t>(B, T, D, false, sms).ws_floats;
    if (vec_bwd_possible(dtype, D)) ws = max64(ws, plan_bwd<scalar_t>(B, T, D, true, sms).ws_floats);
  });
  return ws;
}

cudaError_t gate_norm_bwd_launch(DType dtype, const void* dy, const void* zpre, const float* bias_row,
                                 const void* x, const float* w, const float* rstd, void* dzpre,
                                 float* dbias_row, void* dx, float* dw, float* db, float* workspace,
                                 int64_t workspace_floats, int64_t B, int64_t T, int64_t D, float alpha, float beta,
                                 uint32_t keep_threshold, float keep_scale, const int64_t* seed, bool dropout,
                                 cudaStream_t stream) {
  if (B < 0 || T < 0 || D < 1) return cudaErrorInvalidValue;
  cudaError_t e;
  if (B * T == 0) {  // no rows: every reduction is empty
    if (B > 0) {
      e = cudaMemsetAsync(dbias_row, 0, (size_t)(B * D) * sizeof(float), stream);
      if (e != cudaSuccess) return e;
    }
    e = cudaMemsetAsync(dw, 0, (size_t)D * sizeof(float), stream);
    if (e != cudaSuccess) return e;
    return cudaMemsetAsync(db, 0, (size_t)D * sizeof(float), stream);
  }
  int sms = 0;
  e = current_sm_count(&sms);
  if (e != cudaSuccess) return e;
  const bool vec = vec_bwd_possible(dtype, D) && aligned16(dy) && aligned16(zpre) && aligned16(x) &&
                   aligned16(dzpre) && aligned16(dx) && aligned16(bias_row) && aligned16(w) &&
                   aligned16(dbias_row) && aligned16(workspace);
  BwdPlan p{};
  VGMR_GPU_DISPATCH(dtype, p = plan_bwd<scalar_t>(B, T, D, vec, sms));
  if (workspace == nullptr || workspace_floats < p.ws_floats) return cudaErrorInvalidValue;
  float* part_w = workspace;
  float* part_b = workspace + (int64_t)p.grid * D;
  float* part_bias = workspace + 2 * (int64_t)p.grid * D;
  VGMR_GPU_DISPATCH(dtype, {
    const GateInputs<scalar_t> in{{alpha, beta, keep_threshold, keep_scale, seed, dropout},
                                  static_cast<const scalar_t*>(zpre), bias_row, static_cast<const scalar_t*>(x), w};
    BwdArgs<scalar_t> a{in,
                        static_cast<const scalar_t*>(dy),
                        rstd,
                        static_cast<scalar_t*>(dzpre),
                        static_cast<scalar_t*>(dx),
                        p.nsplit == 1 ? dbias_row : part_bias,
                        part_w,
                        part_b,
                        B,
                        T,
                        D,
                        p.nsplit,
                        p.tc};
    e = launch_bwd<scalar_t>(p, a, stream);
  });
  if (e != cudaSuccess) return e;
  e = launch_reduce(part_w, dw, 1, p.grid, D, sms, stream);
  if (e != cudaSuccess) return e;
  e = launch_reduce(part_b, db, 1, p.grid, D, sms, stream);
  if (e != cudaSuccess) return e;
  if (p.nsplit > 1) e = launch_reduce(part_bias, dbias_row, B, p.nsplit, D, sms, stream);
  return e;
}

}  // namespace gpu
}  // namespace vgmr
