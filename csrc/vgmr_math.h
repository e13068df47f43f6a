// Per-element math shared by the CPU (C++) and CUDA kernels, so the CPU tests
// exercise exactly the arithmetic the GPU runs. No torch headers here.
//   - Philox4x32-10 (Random123) and the dropout keep rule (docs/math.md §5a)
//   - the VGMR gate transform of docs/math.md §5 and its derivative
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define VGMR_HD __host__ __device__ __forceinline__
#else
#define VGMR_HD inline
#endif

namespace vgmr {

// ---- Philox4x32-10 -------------------------------------------------------
// The one C++ definition of the generator's constants and round (Random123); the scalar
// philox4x32_10 below and the CPU kernels' SIMD version (csrc/cpu/gate_norm.cpp, a vector
// lane type U and its own MulHiLo) are both philox10 over this round.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // key schedule (Weyl)

struct U32x4 { uint32_t w[4]; };

VGMR_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = (uint64_t)a * (uint64_t)b;
  hi = (uint32_t)(p >> 32);
  lo = (uint32_t)p;
}

// mulhilo32 as a function object (the scalar lane type of philox_round).
struct MulHiLo32 {
  VGMR_HD void operator()(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) const { mulhilo32(a, b, hi, lo); }
};

// One round on counters (c0, c1, c2, c3) of lane type U (uint32_t, or a vector of them) under
// key (k0, k1); mul(a, b, hi, lo) is the 32x32 -> 64-bit multiply for U.
template <typename U, typename MulHiLo>
VGMR_HD void philox_round(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1, MulHiLo mul) {
  U hi0, lo0, hi1, lo1;
  mul(kPhiloxM0, c0, hi0, lo0);
  mul(kPhiloxM1, c2, hi1, lo1);
  const U n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// Ten rounds with the key schedule: the words of counters (c0, c1, c2, c3) under key seed.
template <typename U, typename MulHiLo>
VGMR_HD void philox10(U& c0, U& c1, U& c2, U& c3, uint64_t seed, MulHiLo mul) {
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1, mul);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Four 32-bit words for counter n under key seed (both 64-bit, split lo/hi).
VGMR_HD U32x4 philox4x32_10(uint64_t seed, uint64_t n) {
  uint32_t c0 = (uint32_t)n, c1 = (uint32_t)(n >> 32), c2 = 0u, c3 = 0u;
  philox10(c0, c1, c2, c3, seed, MulHiLo32{});
  U32x4 r;
  r.w[0] = c0; r.w[1] = c1; r.w[2] = c2; r.w[3] = c3;
  return r;
}

// Counter of element (row r, col c) of a row-major [R, D] tensor: four
// consecutive columns share one Philox call (word c % 4).
VGMR_HD uint64_t philox_counter(int64_t r, int64_t c, int64_t D) {
  return (uint64_t)r * (uint64_t)((D + 3) / 4) + (uint64_t)(c / 4);
}

// keep iff word >= threshold, threshold = min(2^32-1, floor(p * 2^32)) (host, double).
VGMR_HD bool dropout_keep(uint32_t word, uint32_t threshold) { return word >= threshold; }

// The keep threshold (docs/math.md §5a), computed in double: min(2^32-1, floor(p * 2^32)).
// p must already be checked to lie in [0, 1).
VGMR_HD uint32_t dropout_threshold(double p) {
  double t = p * 4294967296.0;
  if (!(t > 0.0)) return 0u;
  if (t >= 4294967295.0) return 0xFFFFFFFFu;
  return (uint32_t)t;  // truncation == floor for t >= 0
}

// Scale applied to kept values: 1 / (1 - p), rounded once from double.
VGMR_HD double dropout_scale(double p) { return 1.0 / (1.0 - p); }

// The Philox word that decides element (r, c) of a row-major [R, D] tensor.
VGMR_HD uint32_t dropout_word(uint64_t seed, int64_t r, int64_t c, int64_t D) {
  return philox4x32_10(seed, philox_counter(r, c, D)).w[c & 3];
}

// ---- Gate (docs/math.md §5) ----------------------------------------------------------
// G = sigmoid(z); Ghat = 1 + alpha(2G-1); Geff = beta + (1-beta) Ghat.
VGMR_HD float sigmoidf_(float z) {
  // expf (not __expf) on both sides so CPU and GPU round alike.
  return 1.0f / (1.0f + expf(-z));
}

VGMR_HD float gate_eff(float g, float alpha, float beta) {
  return beta + (1.0f - beta) * (1.0f + alpha * (2.0f * g - 1.0f));
}

// dGeff/dz = 2 alpha (1-beta) G (1-G)
VGMR_HD float gate_eff_grad(float g, float alpha, float beta) {
  return 2.0f * alpha * (1.0f - beta) * g * (1.0f - g);
}

// The same gate in linear form, Geff = c0 + c1 G and dGeff/dz = c1 G (1-G), with the two
// coefficients computed once per launch in double (the CPU kernels use this form: 2 flops
// per element instead of 5; it differs from gate_eff by rounding only).
VGMR_HD float gate_lin_c0(double alpha, double beta) { return (float)(beta + (1.0 - beta) * (1.0 - alpha)); }
VGMR_HD float gate_lin_c1(double alpha, double beta) { return (float)(2.0 * alpha * (1.0 - beta)); }

// ---- LayerNorm row step (docs/math.md §5, docs/ops.md) --------------------------------
// Forward, per row of D values v (the row statistics of docs/ops.md, on every backend):
// shift K = v[0]; mean_s = sum(v - K)/D; var = sum((v - K - mean_s)^2)/D (biased);
// rstd = 1/sqrt(var + eps); vhat = ((v - K) - mean_s) * rstd; y = vhat * w + b; the saved
// mean is K + mean_s. A row constant along D gives v - K = 0 exactly, so y = b exactly.
// Overflow: var = +inf (a row whose (v - K)^2 overflows) would give rstd = 0 and a silent
// y = b; rstd is NaN instead, so the row's outputs and gradients are NaN, as in eager.
template <typename acc_t>
VGMR_HD acc_t ln_rstd(acc_t var, acc_t eps) {
  const acc_t r = (acc_t)1 / sqrt(var + eps);
  // r == 0 only for var = +inf (var + eps >= eps otherwise); NaN var stays NaN
  return r > (acc_t)0 ? r : (acc_t)NAN;
}

// Backward, per element, with vhat = (v - mean) * rstd, dvhat = g * w and the row
// means a = mean_D(dvhat), c = mean_D(dvhat * vhat):  dv = rstd * (dvhat - a - vhat * c).
template <typename acc_t>
VGMR_HD acc_t ln_bwd_dv(acc_t dvhat, acc_t vhat, acc_t a, acc_t c, acc_t rstd) {
  return rstd * (dvhat - a - vhat * c);
}

// Double-precision gate transform (the CPU kernels' float64 path, used by gradcheck).
VGMR_HD double sigmoid_d(double z) { return 1.0 / (1.0 + exp(-z)); }
VGMR_HD double gate_eff_d(double g, double alpha, double beta) {
  return beta + (1.0 - beta) * (1.0 + alpha * (2.0 * g - 1.0));
}
VGMR_HD double gate_eff_grad_d(double g, double alpha, double beta) {
  return 2.0 * alpha * (1.0 - beta) * g * (1.0 - g);
}

}  // namespace vgmr
