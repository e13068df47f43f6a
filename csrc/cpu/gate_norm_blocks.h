// gate_norm's vector math over one block of rows (csrc/cpu/gate_norm.cpp runs the row loops,
// the float64 path and the entry points): the gate, the row statistics, the dropout keep
// factors, the forward and backward of a block, and their ISA dispatch. float32 on W-lane
// vectors (simd.h), the same arithmetic in every ISA clone. CPU only.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_common.h"
#include "simd.h"
#include "vgmr_math.h"

namespace vgmr {
namespace cpu {
namespace gate_norm_blocks {
using namespace ::vgmr::cpu::simd;  // the vector helpers

constexpr double kEps = 1e-5;

struct Params {
  double alpha, beta, p;
  uint64_t seed;
  uint32_t thr;
  double scale;
};


// Mean of v[0..D) - K over a row (masked full vectors, fixed tree): the shifted mean of the
// row statistics (docs/ops.md). One function for the forward and the backward, so the
// backward recomputes mean_s with the forward's bits.
template <int W>
VGMR_ALWAYS_INLINE float shifted_mean(const float* __restrict__ v, int64_t D, float K, float invD) {
  typename V<W>::vf acc = splat<W>(0.0f);
  for (int64_t d = 0; d < D; d += W) acc += keep_if<W>(lanes_below<W>(D - d), load<W>(v + d) - K);
  return hsum<W>(acc) * invD;
}

// Gate in linear form: Geff = c0 + c1 G, dGeff/dz = c1 G (1 - G), with
// c1 = 2 alpha (1 - beta), c0 = beta + (1 - beta)(1 - alpha) (docs/math.md §5, expanded).
struct Gate {
  float c0, c1;
  explicit Gate(const Params& P) : c0(vgmr::gate_lin_c0(P.alpha, P.beta)), c1(vgmr::gate_lin_c1(P.alpha, P.beta)) {}
};

// Keep factors of the rows of a block, flat ([k, D]): scale or 0.
template <int W>
VGMR_ALWAYS_INLINE void keep_flat(uint32_t* __restrict__ words, int64_t r, int64_t k, int64_t D, const Params& P,
                                  float* __restrict__ kbuf) {
  const int64_t q = (D + 3) / 4, q4 = 4 * q;
  const uint32_t thr = P.thr;
  const float scale = (float)P.scale;
  philox_run_v<W>(P.seed, (uint64_t)r * (uint64_t)q, k * q, words);
  const auto s = splat<W>(scale);
  for (int64_t j = 0; j < k; ++j) {
    const uint32_t* wr = words + j * q4;
    float* kr = kbuf + j * D;
    // full vectors may write past the row: into the next row (rewritten next) or the slack
    for (int64_t d = 0; d < D; d += W) store<W>(kr + d, keep_if<W>(loadu<W>(wr + d) >= thr, s));
  }
}

// Forward of one block: k rows (zr, xr flat), bias rows repeated in bp, w / bln padded
// with zeros past D; writes y (flat, exact) and mean/rstd of the k rows.
template <int W>
VGMR_ALWAYS_INLINE void fwd_block(const float* __restrict__ zr, const float* __restrict__ xr,
                                  const float* __restrict__ bp, const float* __restrict__ w,
                                  const float* __restrict__ bln, float* __restrict__ yr,
                                  float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t r, int64_t k,
                                  int64_t D, const Params& P, float* __restrict__ vbuf, float* __restrict__ kbuf,
                                  uint32_t* __restrict__ words) {
  VGMR_VEC_TYPES
  const Gate G(P);
  const int64_t n = k * D;
  const bool drop = P.p > 0.0;
  // 1. gate and product, flat over the block
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf g = sigmoid<W>(load<W>(zr + i) + load<W>(bp + i));
    store<W>(vbuf + i, (G.c0 + G.c1 * g) * load<W>(xr + i));
  }
  if (i < n) {
    const int64_t m = n - i;
    const vf g = sigmoid<W>(load_n<W>(zr + i, m) + load_n<W>(bp + i, m));
    store<W>(vbuf + i, (G.c0 + G.c1 * g) * load_n<W>(xr + i, m));
  }
  if (drop) keep_flat<W>(words, r, k, D, P, kbuf);
  const float invD = 1.0f / (float)D;
  const float eps = (float)kEps;
  // 2. per row: the row statistics of docs/ops.md (shift by K = v[0], two passes), then y
  for (int64_t j = 0; j < k; ++j) {
    const float* __restrict__ v = vbuf + j * D;
    const float K = v[0];
    const float ms = shifted_mean<W>(v, D, K, invD);
    vf acc2 = splat<W>(0.0f);
    for (int64_t d = 0; d < D; d += W) {
      const vf c = keep_if<W>(lanes_below<W>(D - d), (load<W>(v + d) - K) - ms);
      acc2 += c * c;
    }
    const float rstd = vgmr::ln_rstd<float>(hsum<W>(acc2) * invD, eps);
    mean_out[j] = K + ms;
    rstd_out[j] = rstd;
    float* __restrict__ y = yr + j * D;
    const float* __restrict__ kr = kbuf + j * D;
    for (int64_t d = 0; d < D; d += W) {  // w, bln padded: full loads are safe
      vf o = (((load<W>(v + d) - K) - ms) * rstd) * load<W>(w + d) + load<W>(bln + d);
      if (drop) o = o * load<W>(kr + d);
      if (d + W <= D) {
        store<W>(y + d, o);
      } else {
        store_n<W>(y + d, o, D - d);
      }
    }
  }
}

// Backward of one block: k rows (flat inputs zr, xr, dyr), writes dz, dx (flat, exact; dx
// skipped when dxr is null: the caller asked for no input gradient) and
// accumulates this chunk's partial sums (rows of padded length, masked lanes add 0).
template <int W>
VGMR_ALWAYS_INLINE void bwd_block(const float* __restrict__ zr, const float* __restrict__ xr,
                                  const float* __restrict__ dyr, const float* __restrict__ bp,
                                  const float* __restrict__ wpad, const float* __restrict__ rstd_in,
                                  float* __restrict__ dzr, float* __restrict__ dxr, float* __restrict__ part_w,
                                  float* __restrict__ part_b, float* __restrict__ part_bias, int64_t r, int64_t k,
                                  int64_t D, const Params& P,
                                  float* __restrict__ vbuf, float* __restrict__ gebuf, float* __restrict__ xgbuf,
                                  float* __restrict__ gybuf, float* __restrict__ kbuf, uint32_t* __restrict__ words) {
  VGMR_VEC_TYPES
  const Gate G(P);
  const int64_t n = k * D;
  const bool drop = P.p > 0.0;
  if (drop) keep_flat<W>(words, r, k, D, P, kbuf);
  const float invD = 1.0f / (float)D;
  // 1. recompute the gate, flat over the block: v = Geff x, Geff, x dGeff/dz, g = dy keep
  for (int64_t i = 0; i < n; i += W) {
    const bool full = i + W <= n;
    const int64_t m = n - i;
    const vf z = full ? load<W>(zr + i) + load<W>(bp + i) : load_n<W>(zr + i, m) + load_n<W>(bp + i, m);
    const vf xv = full ? load<W>(xr + i) : load_n<W>(xr + i, m);
    vf gy = full ? load<W>(dyr + i) : load_n<W>(dyr + i, m);
    const vf g = sigmoid<W>(z);
    const vf ge = G.c0 + G.c1 * g;
    store<W>(vbuf + i, ge * xv);
    store<W>(gebuf + i, ge);
    store<W>(xgbuf + i, xv * (G.c1 * g * (1.0f - g)));
    if (drop) gy = gy * load<W>(kbuf + i);
    store<W>(gybuf + i, gy);
  }
  for (int64_t j = 0; j < k; ++j) {
    const int64_t o = j * D;
    // v-hat exactly as the forward rounded it: the same shift K and shifted mean, recomputed
    // from the row (the saved mean K + mean_s is not enough to get mean_s back bit for bit)
    const float K = vbuf[o];
    const float ms = shifted_mean<W>(vbuf + o, D, K, invD);
    const float rstd = rstd_in[j];
    // 2. LayerNorm backward row sums, and the chunk's dln_weight / dln_bias partials
    vf va = splat<W>(0.0f), vc = splat<W>(0.0f);
    for (int64_t d = 0; d < D; d += W) {
      const vi on = lanes_below<W>(D - d);
      const vf vh = keep_if<W>(on, ((load<W>(vbuf + o + d) - K) - ms) * rstd);
      const vf gy = keep_if<W>(on, load<W>(gybuf + o + d));
      const vf dvh = gy * load<W>(wpad + d);
      store<W>(part_b + d, load<W>(part_b + d) + gy);
      store<W>(part_w + d, load<W>(part_w + d) + gy * vh);
      va += dvh;
      vc += dvh * vh;
    }
    const float a = hsum<W>(va) * invD, c = hsum<W>(vc) * invD;
    // 3. dv, then dx = dv Geff, dz = dv x dGeff/dz
    float* __restrict__ dz = dzr + o;
    float* __restrict__ dx = dxr == nullptr ? nullptr : dxr + o;
    for (int64_t d = 0; d < D; d += W) {
      const vf vh = ((load<W>(vbuf + o + d) - K) - ms) * rstd;
      const vf dvh = load<W>(gybuf + o + d) * load<W>(wpad + d);
      const vf dv = rstd * ((dvh - a) - vh * c);
      vf gdz = dv * load<W>(xgbuf + o + d);
      if (d + W <= D) {
        if (dx != nullptr) store<W>(dx + d, dv * load<W>(gebuf + o + d));
        store<W>(dz + d, gdz);
      } else {
        if (dx != nullptr) store_n<W>(dx + d, dv * load<W>(gebuf + o + d), D - d);
        store_n<W>(dz + d, gdz, D - d);
        gdz = keep_if<W>(lanes_below<W>(D - d), gdz);
      }
      store<W>(part_bias + d, load<W>(part_bias + d) + gdz);
    }
  }
}

#define VGMR_FWD_BLOCK_ARGS                                                                                       \
  const float *zr, const float *xr, const float *bp, const float *w, const float *bln, float *yr, float *mean_out, \
      float *rstd_out, int64_t r, int64_t k, int64_t D, const Params &P, float *vbuf, float *kbuf, uint32_t *words
#define VGMR_FWD_BLOCK_PASS zr, xr, bp, w, bln, yr, mean_out, rstd_out, r, k, D, P, vbuf, kbuf, words
#define VGMR_BWD_BLOCK_ARGS                                                                                    \
  const float *zr, const float *xr, const float *dyr, const float *bp, const float *wpad, const float *rstd_in, \
      float *dzr, float *dxr, float *part_w, float *part_b, float *part_bias, int64_t r, int64_t k, int64_t D,     \
      const Params &P, float *vbuf, float *gebuf, float *xgbuf, float *gybuf, float *kbuf, uint32_t *words
#define VGMR_BWD_BLOCK_PASS                                                                                      \
  zr, xr, dyr, bp, wpad, rstd_in, dzr, dxr, part_w, part_b, part_bias, r, k, D, P, vbuf, gebuf, xgbuf, gybuf, \
      kbuf, words

VGMR_SIMD_DISPATCH(fwd_block_f32, fwd_block, VGMR_FWD_BLOCK_ARGS, VGMR_FWD_BLOCK_PASS)
VGMR_SIMD_DISPATCH(bwd_block_f32, bwd_block, VGMR_BWD_BLOCK_ARGS, VGMR_BWD_BLOCK_PASS)

}  // namespace gate_norm_blocks
}  // namespace cpu
}  // namespace vgmr
