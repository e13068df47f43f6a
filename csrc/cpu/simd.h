// W-lane float vectors for the CPU kernels (GCC vector extensions): lanes, loads and stores,
// masks, a fixed-tree horizontal sum, a Cephes exp, the sigmoid and the Philox4x32-10 stream of
// csrc/vgmr_math.h on W counters at a time. CPU only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_common.h"
#include "vgmr_math.h"

// The vector helpers are always inlined into their callers, so no vector crosses a function
// boundary: GCC's "vector ABI changes" note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace vgmr {
namespace cpu {
namespace simd {
// W-lane vectors: W = 16 in the AVX-512 build of the kernels, 8 elsewhere (a 16-lane generic
// vector is split badly on AVX2). The lane count fixes the reduction order, so results are
// identical for every thread count and every run on one machine.
template <int W>
struct V {
  typedef float vf __attribute__((vector_size(4 * W)));
  typedef int32_t vi __attribute__((vector_size(4 * W)));
  typedef uint32_t vu __attribute__((vector_size(4 * W)));
  typedef uint64_t vu64 __attribute__((vector_size(8 * W)));
};

#define VGMR_VEC_TYPES                                  \
  using vf [[maybe_unused]] = typename V<W>::vf;        \
  using vi [[maybe_unused]] = typename V<W>::vi;        \
  using vu [[maybe_unused]] = typename V<W>::vu;

template <int W>
VGMR_ALWAYS_INLINE typename V<W>::vf splat(float a) {
  return typename V<W>::vf{} + a;
}
template <int W>
VGMR_ALWAYS_INLINE typename V<W>::vf load(const float* p) {
  typename V<W>::vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int W>
VGMR_ALWAYS_INLINE typename V<W>::vu loadu(const uint32_t* p) {
  typename V<W>::vu v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int W>
VGMR_ALWAYS_INLINE void store(float* p, typename V<W>::vf v) {
  std::memcpy(p, &v, sizeof(v));
}
// n < W elements, the other lanes zero
template <int W>
VGMR_ALWAYS_INLINE typename V<W>::vf load_n(const float* p, int64_t n) {
  typename V<W>::vf v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}
template <int W>
VGMR_ALWAYS_INLINE void store_n(float* p, typename V<W>::vf v, int64_t n) {
  std::memcpy(p, &v, n * sizeof(float));
}
template <int W>
VGMR_ALWAYS_INLINE typename V<W>::vi lanes_below(int64_t n) {  // lane l active iff l < n
  typename V<W>::vi iota;
  for (int l = 0; l < W; ++l) iota[l] = l;
  return iota < (int32_t)std::min<int64_t>(n, W);
}
template <int W>
VGMR_ALWAYS_INLINE typename V<W>::vf keep_if(typename V<W>::vi m, typename V<W>::vf a) {  // a where m, else +0
  return (typename V<W>::vf)((typename V<W>::vi)a & m);
}
template <int W>
VGMR_ALWAYS_INLINE typename V<W>::vf select(typename V<W>::vi m, typename V<W>::vf a, typename V<W>::vf b) {
  return m ? a : b;
}
// Fixed tree: halves added until 4 lanes, then (l0 + l2) + (l1 + l3).
template <int W>
VGMR_ALWAYS_INLINE float hsum(typename V<W>::vf v) {
  if constexpr (W == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    typename V<W / 2>::vf a, b;
    std::memcpy(&a, &v, sizeof(a));
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof(a), sizeof(b));
    return hsum<W / 2>(a + b);
  }
}

// Cephes expf (about 1 ulp on the clamped range [-87, 88]); NaN propagates.
template <int W>
VGMR_ALWAYS_INLINE typename V<W>::vf exp(typename V<W>::vf x) {
  VGMR_VEC_TYPES
  const vi nan = x != x;
  vf xc = select<W>(x > -87.0f, x, splat<W>(-87.0f));  // NaN -> -87 here, restored below
  xc = select<W>(xc < 88.0f, xc, splat<W>(88.0f));
  const vf kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  vf r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  vf p = splat<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi ki = __builtin_convertvector(kf, vi);
  const vf res = p * (vf)((ki + 127) << 23);
  return select<W>(nan, x, res);
}

template <int W>
VGMR_ALWAYS_INLINE typename V<W>::vf sigmoid(typename V<W>::vf z) {
  return 1.0f / (1.0f + exp<W>(-z));
}

// vgmr::mulhilo32 on W lanes: 32x32 -> 64-bit products of a constant and each lane.
template <int W>
struct VecMulHiLo {
  using vu = typename V<W>::vu;
  using vu64 = typename V<W>::vu64;
  VGMR_ALWAYS_INLINE void operator()(uint32_t a, vu b, vu& hi, vu& lo) const {
    const vu64 p = __builtin_convertvector(b, vu64) * (uint64_t)a;
    hi = __builtin_convertvector(p >> 32, vu);
    lo = __builtin_convertvector(p, vu);
  }
};

// Philox4x32-10 (vgmr::philox10 of vgmr_math.h) on W counters at a time: words of the
// counters n0 .. n0+count-1, out[4*i + w] = word w of counter n0 + i (as philox_run).
template <int W>
VGMR_ALWAYS_INLINE void philox_run_v(uint64_t seed, uint64_t n0, int64_t count, uint32_t* __restrict__ out) {
  using vu = typename V<W>::vu;
  using vu64 = typename V<W>::vu64;
  vu64 iota;
  for (int l = 0; l < W; ++l) iota[l] = (uint64_t)l;
  for (int64_t k0 = 0; k0 < count; k0 += W) {
    const vu64 n = iota + (n0 + (uint64_t)k0);
    vu c0 = __builtin_convertvector(n, vu);
    vu c1 = __builtin_convertvector(n >> 32, vu);
    vu c2 = vu{}, c3 = vu{};
    vgmr::philox10(c0, c1, c2, c3, seed, VecMulHiLo<W>{});
    const int64_t m = std::min<int64_t>(W, count - k0);
    uint32_t* __restrict__ o = out + 4 * k0;
    for (int64_t i = 0; i < m; ++i) {
      o[4 * i + 0] = c0[i];
      o[4 * i + 1] = c1[i];
      o[4 * i + 2] = c2[i];
      o[4 * i + 3] = c3[i];
    }
  }
}

#if defined(VGMR_X86_MULTIVERSION)
// The lane count of this machine: 16 with AVX-512 (unless the tests force the narrow path), else 8.
inline bool use_w16() {
  if (g_force_narrow_simd.load(std::memory_order_relaxed)) return false;
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("bmi2");
  return yes;
}
#endif

}  // namespace simd
}  // namespace cpu
}  // namespace vgmr

// ISA dispatch: VGMR_SIMD_DISPATCH(name, kernel, ARGS, PASS) defines `void name(ARGS)` running
// kernel<16>(PASS) in an AVX-512 build (x86-64-v4) where simd::use_w16(), else kernel<8>(PASS)
// cloned for AVX2 (x86-64-v3) and the x86-64 baseline; without multi-versioning, kernel<8>.
// ARGS and PASS are macros naming the parameter list and the matching argument list.
#if defined(VGMR_X86_MULTIVERSION)
#define VGMR_SIMD_DISPATCH(name, kernel, ARGS, PASS)                                                     \
  static __attribute__((target("arch=x86-64-v4"))) void name##_w16(ARGS) { kernel<16>(PASS); }           \
  static __attribute__((target_clones("arch=x86-64-v3", "default"))) void name##_w8(ARGS) {          \
    kernel<8>(PASS);                                                                                     \
  }                                                                                                      \
  inline void name(ARGS) {                                                                               \
    if (::vgmr::cpu::simd::use_w16()) {                                                                  \
      name##_w16(PASS);                                                                                  \
    } else {                                                                                             \
      name##_w8(PASS);                                                                                   \
    }                                                                                                    \
  }
#else
#define VGMR_SIMD_DISPATCH(name, kernel, ARGS, PASS) \
  inline void name(ARGS) { kernel<8>(PASS); }
#endif
