// gate_norm (docs/math.md §5, docs/ops.md): sigmoid gate, amplification, residual retention,
// product with x, LayerNorm over D and dropout (shared Philox stream), one pass per row.
//   forward : reads zpre and x once, writes y once; saves per-row mean and rstd only
//   backward: recomputes G, Geff, v-hat and the keep mask; dln_weight, dln_bias and
//             dbias_row are reduced deterministically (fixed chunks of rows -> fp32
//             partials [chunks, D] -> one ordered reduction; no atomics). The chunking
//             depends on (B, T, D) only, so results do not depend on the thread count.
//
// Two implementations:
//   - float32 / float16 / bfloat16: explicit 16-lane vectors (GCC vector extensions). The
//     elementwise gate math runs flat over a block of rows (short rows need no per-row
//     tail), the per-row reductions run as masked full vectors over thread-local buffers
//     and fold with a fixed tree, so the arithmetic (and its rounding) is the same in every
//     ISA clone (AVX-512, AVX2, SSE2). Half inputs are converted per block to fp32 scratch.
//   - float64 (gradcheck): plain scalar loops with libm exp.
#include <string>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "gate_norm_blocks.h"
#include "workspace.h"
#include "vgmr_math.h"

namespace vgmr {
namespace cpu {
namespace {

using gate_norm_blocks::kEps;
using gate_norm_blocks::Params;

// ---- blocks of rows and work buffers ------------------------------------------------------
// A block is k <= block_rows(D) consecutive rows of one batch row: the elementwise pass runs
// over its k * D elements at once.
constexpr int64_t kBlock = 1024;
inline int64_t block_rows(int64_t D) { return std::max<int64_t>(1, kBlock / D); }

template <typename T>
VGMR_ALWAYS_INLINE void prefetch_run(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * (int64_t)sizeof(T);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// ---- dropout: Philox words for a run of consecutive counters ---------------------------
// Rows r .. r+k-1 of a [R, D] tensor use the consecutive counters r*q .. (r+k)*q - 1
// (q = ceil(D/4)), so a block of rows is one run; out[4*i + w] is word w of counter n0 + i,
// i.e. out[j*4q + c] decides column c of row r + j. Scalar (the float64 path); the float
// path's vector version is simd::philox_run_v (simd.h). Both are vgmr::philox10 of vgmr_math.h.
inline void philox_run(uint64_t seed, uint64_t n0, int64_t count, uint32_t* __restrict__ out) {
  for (int64_t i = 0; i < count; ++i) {
    const vgmr::U32x4 w = vgmr::philox4x32_10(seed, n0 + (uint64_t)i);
    for (int j = 0; j < 4; ++j) out[4 * i + j] = w.w[j];
  }
}


// Per-thread work buffers, carved from one workspace tensor. The launchers allocate the small
// outputs, then the temporaries, then the big outputs: with a small block freed above a big
// one, glibc trims the heap and the big outputs page-fault afresh on every call (measured:
// ~2300 faults, ~2.5 ms per backward at B=32, T=50, D=768; 0 in this order).
struct WorkF {
  float* base;
  int64_t stride;
  int nbufs;
  // floats per thread: nbufs row-block buffers, the Philox words, 2 padded [D] vectors
  static int64_t stride_for(int64_t D) { return padded(std::max<int64_t>(D, block_rows(D) * D)); }
  static int64_t words_for(int64_t D) { return padded(block_rows(D) * 4 * ((D + 3) / 4)); }
  static int64_t floats_per_thread(int64_t D, int nbufs) {
    return nbufs * stride_for(D) + words_for(D) + 2 * padded(D);
  }
  WorkF(float* ws, int64_t D, int n) : base(ws), stride(stride_for(D)), nbufs(n) {}
  float* buf(int i) { return base + i * stride; }
  uint32_t* words() { return reinterpret_cast<uint32_t*>(base + nbufs * stride); }
  // two [D] vectors padded with zeros (ln_weight / ln_bias): masked vectors read past D
  float* vec(int i, int64_t D) { return base + nbufs * stride + words_for(D) + i * padded(D); }
};

constexpr int kFwdBufsF32 = 3, kFwdBufsHalf = 6, kBwdBufsF32 = 7, kBwdBufsHalf = 12;

// The vec path's zeroed per-thread buffers: one WorkF per pool thread, none for float64 (the
// scalar path); `bufs_f32` / `bufs_half`: WorkF row buffers for float32 / half inputs.
ThreadWorkspaces gate_workspaces(const at::Tensor& x, int bufs_f32, int bufs_half) {
  const at::ScalarType dt = x.scalar_type();
  return ThreadWorkspaces(x, dt == at::kDouble ? 0 : WorkF::floats_per_thread(x.size(2), dt == at::kFloat ? bufs_f32
                                                                                                          : bufs_half));
}

// The gate inputs (zpre, x [B, T, D], bias_row [B, D], ln_weight [D]) as both directions read them.
template <typename scalar_t>
struct GateData {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* z;
  const scalar_t* x;
  const acc_t* bias;
  const acc_t* w;
  GateData(const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x_, const at::Tensor& ln_weight)
      : z(zpre.const_data_ptr<scalar_t>()),
        x(x_.const_data_ptr<scalar_t>()),
        bias(bias_row.const_data_ptr<acc_t>()),
        w(ln_weight.const_data_ptr<acc_t>()) {}
};

template <typename scalar_t>
VGMR_ALWAYS_INLINE void to_float(const scalar_t* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = (float)src[i];
}
template <typename scalar_t>
VGMR_ALWAYS_INLINE void from_float(const float* __restrict__ src, int64_t n, scalar_t* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = (scalar_t)src[i];
}

// Forward over rows [r0, r1) for float / half inputs.
template <typename scalar_t>
void fwd_range_vec(const scalar_t* zp, const scalar_t* xp, const float* bias, const float* w, const float* bln,
                   scalar_t* yp, float* mean_out, float* rstd_out, int64_t r0, int64_t r1, int64_t T, int64_t D,
                   const Params& P, float* ws) {
  constexpr bool F32 = std::is_same_v<scalar_t, float>;
  // buffers: v, keep, repeated bias, (half) zpre / x / y scratch
  WorkF work(ws, D, F32 ? kFwdBufsF32 : kFwdBufsHalf);
  float* wz = work.vec(0, D);  // ln_weight, ln_bias with zeros past D
  float* bz = work.vec(1, D);
  std::memset(wz, 0, padded(D) * sizeof(float));
  std::memset(bz, 0, padded(D) * sizeof(float));
  std::memcpy(wz, w, D * sizeof(float));
  std::memcpy(bz, bln, D * sizeof(float));
  w = wz;
  bln = bz;
  float* vbuf = work.buf(0);
  float* kbuf = work.buf(1);
  float* brep = work.buf(2);
  const int64_t kmax = block_rows(D);
  int64_t brep_b = -1;
  for (int64_t r = r0; r < r1;) {
    const int64_t b = r / T, t = r % T;
    const int64_t k = std::min<int64_t>(std::min<int64_t>(r1 - r, T - t), kmax);
    const int64_t n = k * D;
    const int64_t off = r * D;
    const float* bp = bias + b * D;
    if (kmax > 1) {
      if (brep_b != b) {
        for (int64_t j = 0, nr = std::min<int64_t>(kmax, T); j < nr; ++j) std::memcpy(brep + j * D, bp, D * 4);
        brep_b = b;
      }
      bp = brep;
    }
    if (r + k < r1) {  // the next block's inputs
      prefetch_run(zp + off + n, std::min<int64_t>(n, (r1 - r - k) * D));
      prefetch_run(xp + off + n, std::min<int64_t>(n, (r1 - r - k) * D));
    }
    if constexpr (F32) {
      gate_norm_blocks::fwd_block_f32(zp + off, xp + off, bp, w, bln, yp + off, mean_out + r, rstd_out + r, r, k, D,
                                      P, vbuf,
                          kbuf, work.words());
    } else {
      float* zf = work.buf(3);
      float* xf = work.buf(4);
      float* yf = work.buf(5);
      to_float(zp + off, n, zf);
      to_float(xp + off, n, xf);
      gate_norm_blocks::fwd_block_f32(zf, xf, bp, w, bln, yf, mean_out + r, rstd_out + r, r, k, D, P, vbuf, kbuf,
                                      work.words());
      from_float(yf, n, yp + off);
    }
    r += k;
  }
}

// Backward over one chunk of rows [r0, r0 + nrows) of one batch row; partials overwritten.
template <typename scalar_t>
void bwd_chunk_vec(const scalar_t* dyp, const scalar_t* zp, const scalar_t* xp, const float* bias, const float* wpad,
                   const float* rstd_in, scalar_t* dzp, scalar_t* dxp, float* part_w,
                   float* part_b, float* part_bias, int64_t Dp, int64_t r0, int64_t nrows, int64_t T, int64_t D,
                   const Params& P, WorkF& work) {
  constexpr bool F32 = std::is_same_v<scalar_t, float>;
  std::memset(part_w, 0, Dp * sizeof(float));
  std::memset(part_b, 0, Dp * sizeof(float));
  std::memset(part_bias, 0, Dp * sizeof(float));
  const int64_t kmax = block_rows(D);
  const float* bp = bias + (r0 / T) * D;  // a chunk never crosses a batch row
  float* brep = work.buf(6);
  if (kmax > 1) {
    for (int64_t j = 0, nr = std::min<int64_t>(kmax, nrows); j < nr; ++j) std::memcpy(brep + j * D, bp, D * 4);
    bp = brep;
  }
  const int64_t r1 = r0 + nrows;
  for (int64_t r = r0; r < r1;) {
    const int64_t k = std::min<int64_t>(r1 - r, kmax);
    const int64_t n = k * D;
    const int64_t off = r * D;
    if (r + k < r1) {
      const int64_t nn = std::min<int64_t>(n, (r1 - r - k) * D);
      prefetch_run(zp + off + n, nn);
      prefetch_run(xp + off + n, nn);
      prefetch_run(dyp + off + n, nn);
    }
    if constexpr (F32) {
      gate_norm_blocks::bwd_block_f32(zp + off, xp + off, dyp + off, bp, wpad, rstd_in + r, dzp + off,
                          dxp == nullptr ? nullptr : dxp + off,
                          part_w, part_b, part_bias, r, k, D, P, work.buf(0), work.buf(1), work.buf(2), work.buf(3),
                          work.buf(4), work.words());
    } else {
      float* zf = work.buf(7);
      float* xf = work.buf(8);
      float* dyf = work.buf(9);
      float* dzf = work.buf(10);
      float* dxf = dxp == nullptr ? nullptr : work.buf(11);
      to_float(zp + off, n, zf);
      to_float(xp + off, n, xf);
      to_float(dyp + off, n, dyf);
      gate_norm_blocks::bwd_block_f32(zf, xf, dyf, bp, wpad, rstd_in + r, dzf, dxf, part_w, part_b, part_bias, r, k,
                          D, P, work.buf(0), work.buf(1), work.buf(2), work.buf(3), work.buf(4), work.words());
      from_float(dzf, n, dzp + off);
      if (dxp != nullptr) from_float(dxf, n, dxp + off);
    }
    r += k;
  }
}

// (dispatch helpers below the float64 path)
// ============================================================================================
// float64 path (gradcheck): scalar loops, libm exp, the gate arithmetic of docs/math.md §5
// ============================================================================================
// Mean of v[0..D) - K, in order: the shifted mean of the float64 forward and backward.
double shifted_mean_f64(const double* v, int64_t D, double K) {
  double sum = 0.0;
  for (int64_t d = 0; d < D; ++d) sum += v[d] - K;
  return sum / (double)D;
}

void fwd_range_f64(const double* zp, const double* xp, const double* bias, const double* w, const double* bln,
                   double* yp, double* mean_out, double* rstd_out, int64_t r0, int64_t r1, int64_t T, int64_t D,
                   const Params& P) {
  std::vector<double> v(D);
  std::vector<uint32_t> words(4 * ((D + 3) / 4) + 16);
  const int64_t q = (D + 3) / 4;
  for (int64_t r = r0; r < r1; ++r) {
    const double* zr = zp + r * D;
    const double* xr = xp + r * D;
    const double* br = bias + (r / T) * D;
    for (int64_t d = 0; d < D; ++d) v[d] = vgmr::gate_eff_d(vgmr::sigmoid_d(zr[d] + br[d]), P.alpha, P.beta) * xr[d];
    // the row statistics of docs/ops.md: shift K = v[0], two passes
    const double K = v[0];
    const double ms = shifted_mean_f64(v.data(), D, K);
    double sq = 0.0;
    for (int64_t d = 0; d < D; ++d) sq += ((v[d] - K) - ms) * ((v[d] - K) - ms);
    const double rstd = vgmr::ln_rstd<double>(sq / (double)D, kEps);
    mean_out[r] = K + ms;
    rstd_out[r] = rstd;
    if (P.p > 0.0) philox_run(P.seed, (uint64_t)r * (uint64_t)q, q, words.data());
    double* yr = yp + r * D;
    for (int64_t d = 0; d < D; ++d) {
      double o = ((v[d] - K) - ms) * rstd * w[d] + bln[d];
      if (P.p > 0.0) o = words[d] >= P.thr ? o * P.scale : 0.0;
      yr[d] = o;
    }
  }
}

void bwd_chunk_f64(const double* dyp, const double* zp, const double* xp, const double* bias, const double* w,
                   const double* rstd_in, double* dzp, double* dxp, double* part_w,
                   double* part_b, double* part_bias, int64_t r0, int64_t nrows, int64_t T, int64_t D,
                   const Params& P) {
  std::vector<double> g(D), vh(D), dvh(D), v(D);
  std::vector<uint32_t> words(4 * ((D + 3) / 4) + 16);
  const int64_t q = (D + 3) / 4;
  for (int64_t d = 0; d < D; ++d) part_w[d] = part_b[d] = part_bias[d] = 0.0;
  const double* br = bias + (r0 / T) * D;
  for (int64_t r = r0; r < r0 + nrows; ++r) {
    const double* zr = zp + r * D;
    const double* xr = xp + r * D;
    const double* dyr = dyp + r * D;
    const double rstd = rstd_in[r];
    if (P.p > 0.0) philox_run(P.seed, (uint64_t)r * (uint64_t)q, q, words.data());
    for (int64_t d = 0; d < D; ++d) {
      g[d] = vgmr::sigmoid_d(zr[d] + br[d]);
      v[d] = vgmr::gate_eff_d(g[d], P.alpha, P.beta) * xr[d];
    }
    const double K = v[0];  // the forward's shift and shifted mean, recomputed
    const double ms = shifted_mean_f64(v.data(), D, K);
    double a = 0.0, c = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      vh[d] = ((v[d] - K) - ms) * rstd;
      const double gy = P.p > 0.0 ? (words[d] >= P.thr ? dyr[d] * P.scale : 0.0) : dyr[d];
      dvh[d] = gy * w[d];
      part_b[d] += gy;
      part_w[d] += gy * vh[d];
      a += dvh[d];
      c += dvh[d] * vh[d];
    }
    a /= (double)D;
    c /= (double)D;
    for (int64_t d = 0; d < D; ++d) {
      const double dv = vgmr::ln_bwd_dv<double>(dvh[d], vh[d], a, c, rstd);
      const double dz = dv * xr[d] * vgmr::gate_eff_grad_d(g[d], P.alpha, P.beta);
      if (dxp != nullptr) dxp[r * D + d] = dv * vgmr::gate_eff_d(g[d], P.alpha, P.beta);
      dzp[r * D + d] = dz;
      part_bias[d] += dz;
    }
  }
}

template <typename scalar_t>
void fwd_range(const scalar_t* zp, const scalar_t* xp, const at::opmath_type<scalar_t>* bias,
               const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* bln, scalar_t* yp,
               at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out, int64_t r0, int64_t r1,
               int64_t T, int64_t D, const Params& P, float* ws) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    fwd_range_f64(zp, xp, bias, w, bln, yp, mean_out, rstd_out, r0, r1, T, D, P);
  } else {
    fwd_range_vec<scalar_t>(zp, xp, bias, w, bln, yp, mean_out, rstd_out, r0, r1, T, D, P, ws);
  }
}

// Chunks [c0, c1) of the backward (cpb chunks of tc rows per batch row).
template <typename scalar_t>
void bwd_chunks(const scalar_t* dyp, const scalar_t* zp, const scalar_t* xp, const at::opmath_type<scalar_t>* bias,
                const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* rstd_in, scalar_t* dzp,
                scalar_t* dxp, at::opmath_type<scalar_t>* pp, int64_t Dp, int64_t c0, int64_t c1, int64_t cpb,
                int64_t tc, int64_t T, int64_t D, const Params& P, float* ws) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / cpb, t0 = (c % cpb) * tc, nt = std::min<int64_t>(tc, T - t0);
      double* pc = pp + c * 3 * Dp;
      bwd_chunk_f64(dyp, zp, xp, bias, w, rstd_in, dzp, dxp, pc, pc + Dp, pc + 2 * Dp, b * T + t0, nt, T, D,
                    P);
    }
  } else {
    WorkF work(ws, D, std::is_same_v<scalar_t, float> ? kBwdBufsF32 : kBwdBufsHalf);
    float* wpad = work.vec(0, D);  // ln_weight with zeros past D (masked vectors read it)
    std::memset(wpad, 0, padded(D) * sizeof(float));
    std::memcpy(wpad, w, D * sizeof(float));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / cpb, t0 = (c % cpb) * tc, nt = std::min<int64_t>(tc, T - t0);
      float* pc = pp + c * 3 * Dp;
      bwd_chunk_vec<scalar_t>(dyp, zp, xp, bias, wpad, rstd_in, dzp, dxp, pc, pc + Dp, pc + 2 * Dp,
                              Dp, b * T + t0, nt, T, D, P, work);
    }
  }
}

// ---- argument checks ----------------------------------------------------------------------
at::ScalarType param_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

// `seed`: the int64 Philox key in memory, read only when p > 0 (docs/ops.md: p == 0 never reads it).
Params make_params(double alpha, double beta, double p, const int64_t* seed, const char* op) {
  checks::dropout_p(p, op);
  Params P;
  P.alpha = alpha;
  P.beta = beta;
  P.p = p;
  P.seed = p > 0.0 ? checks::philox_key(*seed) : 0u;
  P.thr = vgmr::dropout_threshold(p);
  P.scale = vgmr::dropout_scale(p);
  return P;
}

constexpr const char* kParam = " (float32 for float32/half inputs, float64 for float64; the op layer casts it)";

void check_main(const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x, const at::Tensor& ln_weight,
                const char* op) {
  check_cpu_float(x, op, "x");
  checks::gate_inputs(check_cpu, zpre, bias_row, x, ln_weight, param_dtype(x.scalar_type()), kParam, op);
}

}  // namespace

// One gate_norm over one modality (declared in csrc/cpu/cpu_common.h; the operator entry points
// are csrc/gate_norm_entries.h's); `seed` points at its int64 key (checked by the caller).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_norm_one(const at::Tensor& zpre, const at::Tensor& bias_row,
                                                             const at::Tensor& x, const at::Tensor& ln_weight,
                                                             const at::Tensor& ln_bias, double alpha, double beta,
                                                             double p, const int64_t* seed, const char* op) {
  check_main(zpre, bias_row, x, ln_weight, op);
  checks::typed(check_cpu, ln_bias, param_dtype(x.scalar_type()), x, {x.size(2)}, op, "ln_bias", "x", "[D]", kParam);
  const Params P = make_params(alpha, beta, p, seed, op);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const at::ScalarType pt = param_dtype(x.scalar_type());
  // Allocation order: small outputs, then temporaries, then the big outputs (see WorkF).
  at::Tensor mean = new_output({B, T}, x.options().dtype(pt));
  at::Tensor rstd = new_output({B, T}, x.options().dtype(pt));
  const ThreadWorkspaces ws = gate_workspaces(x, kFwdBufsF32, kFwdBufsHalf);
  at::Tensor y = new_output({B, T, D}, x.options());
  const int64_t R = B * T;
  if (R == 0) return {y, mean, rstd};
  const int64_t grain = std::max<int64_t>(1, 16384 / D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vgmr_gate_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GateData<scalar_t> in(zpre, bias_row, x, ln_weight);
    const acc_t* lbp = ln_bias.const_data_ptr<acc_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    ws.parallel_for(0, R, grain, [&](int64_t begin, int64_t end, float* work) {
      fwd_range<scalar_t>(in.z, in.x, in.bias, in.w, lbp, yp, mp, rp, begin, end, T, D, P, work);
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_norm_backward_one(
    const at::Tensor& dy, const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x,
    const at::Tensor& ln_weight, const at::Tensor& mean, const at::Tensor& rstd, double alpha, double beta, double p,
    const int64_t* seed, bool need_dx, const char* op) {
  check_main(zpre, bias_row, x, ln_weight, op);
  checks::like(check_cpu, dy, x, x.sizes(), op, "dy", "x", "[B, T, D]");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const at::ScalarType pt = param_dtype(x.scalar_type());
  checks::gate_stats(check_cpu, mean, rstd, x, pt, op);
  const Params P = make_params(alpha, beta, p, seed, op);

  // Fixed chunks of rows within one batch row: tc steps of T each (about 64K elements).
  const int64_t tc = std::max<int64_t>(1, std::min<int64_t>(T, ceil_div(65536, D)));
  const int64_t cpb = ceil_div(T, tc);  // chunks per batch row
  const int64_t nchunks = B * cpb;
  const int64_t Dp = padded(D);
  // Allocation order: small outputs, then temporaries, then the big outputs (see WorkF).
  at::Tensor dbias = new_output({B, D}, x.options().dtype(pt));
  at::Tensor dw = new_output({D}, x.options().dtype(pt));
  at::Tensor db = new_output({D}, x.options().dtype(pt));
  at::Tensor part = new_output({std::max<int64_t>(nchunks, 1), 3, Dp}, x.options().dtype(pt));
  const ThreadWorkspaces ws = gate_workspaces(x, kBwdBufsF32, kBwdBufsHalf);
  at::Tensor dzpre = new_output({B, T, D}, x.options());
  // no input gradient asked for: an empty dx, and the kernels never write one
  at::Tensor dx = need_dx ? new_output({B, T, D}, x.options()) : at::empty({0}, x.options());
  if (B * T == 0) {
    dbias.zero_();
    dw.zero_();
    db.zero_();
    return {dzpre, dbias, dx, dw, db};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vgmr_gate_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GateData<scalar_t> in(zpre, bias_row, x, ln_weight);
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    scalar_t* dzp = dzpre.mutable_data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* pp = part.mutable_data_ptr<acc_t>();
    ws.parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end, float* work) {
      bwd_chunks<scalar_t>(dyp, in.z, in.x, in.bias, in.w, rp, dzp, dxp, pp, Dp, begin, end, cpb, tc, T, D, P, work);
    });
    // One ordered reduction over the chunks.
    acc_t* dwp = dw.mutable_data_ptr<acc_t>();
    acc_t* dbp = db.mutable_data_ptr<acc_t>();
    acc_t* dbiasp = dbias.mutable_data_ptr<acc_t>();
    const int64_t dgrain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, nchunks));
    at::parallel_for(0, D, dgrain, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; ++d) {
        dwp[d] = pp[d];
        dbp[d] = pp[Dp + d];
      }
      for (int64_t c = 1; c < nchunks; ++c) {
        const acc_t* pw = pp + (c * 3 + 0) * Dp;
        const acc_t* pb = pp + (c * 3 + 1) * Dp;
        for (int64_t d = d0; d < d1; ++d) {
          dwp[d] += pw[d];
          dbp[d] += pb[d];
        }
      }
    });
    at::parallel_for(0, B, std::max<int64_t>(1, 65536 / (cpb * D)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* out = dbiasp + b * D;
        const acc_t* first = pp + ((b * cpb) * 3 + 2) * Dp;
        for (int64_t d = 0; d < D; ++d) out[d] = first[d];
        for (int64_t k = 1; k < cpb; ++k) {
          const acc_t* pk = pp + ((b * cpb + k) * 3 + 2) * Dp;
          for (int64_t d = 0; d < D; ++d) out[d] += pk[d];
        }
      }
    });
  });
  return {dzpre, dbias, dx, dw, db};
}

}  // namespace cpu
}  // namespace vgmr
