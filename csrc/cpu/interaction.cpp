// interaction (docs/math.md §2, docs/ops.md): S [B, M, D] -> U [B, M, (3M-1) D], all targets in
// one kernel; backward dU -> dS in one kernel (each task owns one output row of dS, so no
// two tasks write the same element and no atomics are needed).
//   u[b, m] = [s_m; s_j1; ...; s_m*s_j1; ...; |s_m - s_j1|; ...; mean_j s_j], j ascending, j != m
#include "cpu_common.h"

namespace vgmr {
namespace cpu {
namespace {

template <typename acc_t>
VGMR_ALWAYS_INLINE acc_t sign_of(acc_t x) {
  return (acc_t)((x > acc_t(0)) - (x < acc_t(0)));  // sign(0) = 0, as torch.abs' gradient
}

// One target row u[b, m]: s points at s[b] ([M, D]).
template <typename scalar_t>
VGMR_ALWAYS_INLINE void interaction_row_impl(const scalar_t* __restrict__ s, int64_t M, int64_t m, int64_t D,
                                             scalar_t* __restrict__ u) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = M - 1;
  const scalar_t* __restrict__ sm = s + m * D;
  // block 0: s_m
  for (int64_t d = 0; d < D; ++d) u[d] = sm[d];
  scalar_t* __restrict__ ctx = u + (3 * n + 1) * D;
  int64_t i = 0;
  for (int64_t j = 0; j < M; ++j) {
    if (j == m) continue;
    const scalar_t* __restrict__ sj = s + j * D;
    scalar_t* __restrict__ u_s = u + (1 + i) * D;
    scalar_t* __restrict__ u_a = u + (1 + n + i) * D;
    scalar_t* __restrict__ u_d = u + (1 + 2 * n + i) * D;
    for (int64_t d = 0; d < D; ++d) {
      acc_t a = (acc_t)sm[d], b = (acc_t)sj[d];
      u_s[d] = sj[d];
      u_a[d] = (scalar_t)(a * b);
      u_d[d] = (scalar_t)std::abs(a - b);
    }
    ++i;
  }
  // context: sum of the others in ascending order, then / (M - 1)
  for (int64_t d = 0; d < D; ++d) {
    acc_t c = acc_t(0);
    for (int64_t j = 0; j < M; ++j) {
      if (j != m) c += (acc_t)s[j * D + d];
    }
    ctx[d] = (scalar_t)(c / (acc_t)n);
  }
}

// ds[b, k]: every term of every u[b, m] that reads s_k. du points at du[b] ([M, (3M-1) D]).
template <typename scalar_t>
VGMR_ALWAYS_INLINE void interaction_bwd_row_impl(const scalar_t* __restrict__ du, const scalar_t* __restrict__ s,
                                                 int64_t M, int64_t k, int64_t D, scalar_t* __restrict__ ds,
                                                 at::opmath_type<scalar_t>* __restrict__ acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = M - 1;
  const int64_t W = (3 * M - 1) * D;
  const scalar_t* __restrict__ sk = s + k * D;
  const scalar_t* __restrict__ duk = du + k * W;
  // k as the target: s_k block, and s_k in the agreement / discrepancy blocks
  for (int64_t d = 0; d < D; ++d) acc[d] = (acc_t)duk[d];
  {
    int64_t i = 0;
    for (int64_t j = 0; j < M; ++j) {
      if (j == k) continue;
      const scalar_t* __restrict__ sj = s + j * D;
      const scalar_t* __restrict__ g_a = duk + (1 + n + i) * D;
      const scalar_t* __restrict__ g_d = duk + (1 + 2 * n + i) * D;
      for (int64_t d = 0; d < D; ++d) {
        acc_t a = (acc_t)sk[d], b = (acc_t)sj[d];
        acc[d] += (acc_t)g_a[d] * b + (acc_t)g_d[d] * sign_of<acc_t>(a - b);
      }
      ++i;
    }
  }
  // k as a non-target of target m (position i = k or k - 1 in N(m))
  const acc_t cnt = (acc_t)n;
  for (int64_t m = 0; m < M; ++m) {
    if (m == k) continue;
    const int64_t i = k < m ? k : k - 1;
    const scalar_t* __restrict__ sm = s + m * D;
    const scalar_t* __restrict__ dum = du + m * W;
    const scalar_t* __restrict__ g_s = dum + (1 + i) * D;
    const scalar_t* __restrict__ g_a = dum + (1 + n + i) * D;
    const scalar_t* __restrict__ g_d = dum + (1 + 2 * n + i) * D;
    const scalar_t* __restrict__ g_c = dum + (1 + 3 * n) * D;
    for (int64_t d = 0; d < D; ++d) {
      acc_t a = (acc_t)sm[d], b = (acc_t)sk[d];
      acc[d] += (acc_t)g_s[d] + (acc_t)g_a[d] * a - (acc_t)g_d[d] * sign_of<acc_t>(a - b) + (acc_t)g_c[d] / cnt;
    }
  }
  for (int64_t d = 0; d < D; ++d) ds[d] = (scalar_t)acc[d];
}

VGMR_CLONES void interaction_row_f32(const float* s, int64_t M, int64_t m, int64_t D, float* u) {
  interaction_row_impl<float>(s, M, m, D, u);
}
VGMR_CLONES void interaction_bwd_row_f32(const float* du, const float* s, int64_t M, int64_t k, int64_t D, float* ds,
                                         float* acc) {
  interaction_bwd_row_impl<float>(du, s, M, k, D, ds, acc);
}

template <typename scalar_t>
void interaction_row(const scalar_t* s, int64_t M, int64_t m, int64_t D, scalar_t* u) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    interaction_row_f32(s, M, m, D, u);
  } else {
    interaction_row_impl<scalar_t>(s, M, m, D, u);
  }
}

template <typename scalar_t>
void interaction_bwd_row(const scalar_t* du, const scalar_t* s, int64_t M, int64_t k, int64_t D, scalar_t* ds,
                         at::opmath_type<scalar_t>* acc) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    interaction_bwd_row_f32(du, s, M, k, D, ds, acc);
  } else {
    interaction_bwd_row_impl<scalar_t>(du, s, M, k, D, ds, acc);
  }
}

std::pair<int64_t, int64_t> check_s(const at::Tensor& s, const char* op, const char* name) {
  check_cpu_float(s, op, name);
  checks::dim(s, 3, op, name, "[B, M, D]");
  const int64_t M = s.size(1);
  TORCH_CHECK_VALUE(M >= 2, op, ": ", name, " needs M >= 2 modalities (dim 1), got ", M);
  return {M, s.size(2)};
}

}  // namespace

// Entry points (declared in csrc/cpu/cpu_common.h, registered in csrc/ops.cpp).
at::Tensor interaction_cpu(const at::Tensor& s) {
  const char* op = "vgmr::interaction";
  auto [M, D] = check_s(s, op, "s");
  const int64_t B = s.size(0);
  const int64_t W = (3 * M - 1) * D;
  at::Tensor u = new_output({B, M, W}, s.options());
  if (B == 0 || D == 0) return u;
  const int64_t rows = B * M;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, W));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "vgmr_interaction", [&] {
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / M, m = r % M;
        interaction_row<scalar_t>(sp + b * M * D, M, m, D, up + r * W);
      }
    });
  });
  return u;
}

at::Tensor interaction_backward_cpu(const at::Tensor& du, const at::Tensor& s) {
  const char* op = "vgmr::interaction_backward";
  auto [M, D] = check_s(s, op, "s");
  check_cpu_float(du, op, "du");
  checks::dim(du, 3, op, "du", "[B, M, (3M-1)*D]");
  const int64_t B = s.size(0);
  const int64_t W = (3 * M - 1) * D;
  TORCH_CHECK_VALUE(du.size(0) == B && du.size(1) == M && du.size(2) == W, op, ": du must have shape [", B, ", ", M,
                    ", ", W, "] for s of shape ", s.sizes(), ", got ", du.sizes());
  at::Tensor ds = new_output({B, M, D}, du.options());
  if (B == 0 || D == 0) return ds;
  const int64_t rows = B * M;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 3 * M * D));
  const bool same = du.scalar_type() == s.scalar_type();
  // s in the dtype of du (a copy only in the rare mixed-dtype case)
  at::Tensor s_c = same ? s : s.to(du.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, du.scalar_type(), "vgmr_interaction_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dup = du.const_data_ptr<scalar_t>();
    const scalar_t* sp = s_c.const_data_ptr<scalar_t>();
    scalar_t* dsp = ds.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / M, k = r % M;
        interaction_bwd_row<scalar_t>(dup + b * M * W, sp + b * M * D, M, k, D, dsp + r * D, acc.data());
      }
    });
  });
  return ds;
}

}  // namespace cpu
}  // namespace vgmr
