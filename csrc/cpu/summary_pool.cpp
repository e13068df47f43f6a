// summary_pool (docs/math.md §1, docs/ops.md): masked mean and max over time in one pass.
//   forward : h [B, T, D], mask [B, T] bool or None -> mean, max [B, D] (dtype of h),
//             argmax [B, D] int32 (first valid maximal step, -1 for a row with no valid step)
//   backward: dh[b,t,:] = mask[b,t] * dmean[b,:] / max(1, n_b) + 1[t == argmax[b,:]] * dmax[b,:]
#include "cpu_common.h"

namespace vgmr {
namespace cpu {
namespace {

constexpr int64_t kDChunk = 256;  // columns per task: accumulators stay on the stack / in L1

// One (b, column chunk) task: walk the valid steps once, keeping sum, max and argmax.
template <typename scalar_t>
VGMR_ALWAYS_INLINE void pool_chunk_impl(const scalar_t* __restrict__ h, const bool* __restrict__ mask, int64_t T,
                                        int64_t D, int64_t d0, int64_t nd, scalar_t* __restrict__ mean_out,
                                        scalar_t* __restrict__ max_out, int32_t* __restrict__ arg_out) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t sum[kDChunk];
  acc_t mx[kDChunk];
  int32_t am[kDChunk];
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (mask != nullptr && !mask[t]) continue;
    const scalar_t* __restrict__ row = h + t * D + d0;
    const int32_t ti = (int32_t)t;
    if (n == 0) {
      for (int64_t d = 0; d < nd; ++d) {
        acc_t v = (acc_t)row[d];
        sum[d] = v;
        mx[d] = v;
        am[d] = ti;
      }
    } else {
      for (int64_t d = 0; d < nd; ++d) {
        acc_t v = (acc_t)row[d];
        acc_t m = mx[d];
        sum[d] += v;
        // strictly greater keeps the first maximal step; a NaN wins once, then stays (torch.max)
        bool upd = (v > m) | ((v != v) & (m == m));
        mx[d] = upd ? v : m;
        am[d] = upd ? ti : am[d];
      }
    }
    ++n;
  }
  if (n == 0) {
    for (int64_t d = 0; d < nd; ++d) {
      mean_out[d] = scalar_t(0);
      max_out[d] = scalar_t(0);
      arg_out[d] = -1;
    }
  } else {
    const acc_t cnt = (acc_t)n;
    for (int64_t d = 0; d < nd; ++d) {
      mean_out[d] = (scalar_t)(sum[d] / cnt);
      max_out[d] = (scalar_t)mx[d];
      arg_out[d] = am[d];
    }
  }
}

VGMR_CLONES void pool_chunk_f32(const float* h, const bool* mask, int64_t T, int64_t D, int64_t d0, int64_t nd,
                                float* mean_out, float* max_out, int32_t* arg_out) {
  pool_chunk_impl<float>(h, mask, T, D, d0, nd, mean_out, max_out, arg_out);
}

template <typename scalar_t>
void pool_chunk(const scalar_t* h, const bool* mask, int64_t T, int64_t D, int64_t d0, int64_t nd,
                scalar_t* mean_out, scalar_t* max_out, int32_t* arg_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    pool_chunk_f32(h, mask, T, D, d0, nd, mean_out, max_out, arg_out);
  } else {
    pool_chunk_impl<scalar_t>(h, mask, T, D, d0, nd, mean_out, max_out, arg_out);
  }
}

// One row (b, t) of dh.
template <typename scalar_t>
VGMR_ALWAYS_INLINE void pool_bwd_row_impl(const scalar_t* __restrict__ dmean, const scalar_t* __restrict__ dmax,
                                          const int32_t* __restrict__ am, int32_t t, bool valid, int64_t n_b,
                                          int64_t D, scalar_t* __restrict__ dh) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t cnt = (acc_t)(n_b > 0 ? n_b : 1);
  if (valid) {
    for (int64_t d = 0; d < D; ++d) {
      acc_t g = (acc_t)dmean[d] / cnt;
      acc_t gm = am[d] == t ? (acc_t)dmax[d] : acc_t(0);
      dh[d] = (scalar_t)(g + gm);
    }
  } else {
    // a masked step never holds the argmax (argmax only points at valid steps)
    for (int64_t d = 0; d < D; ++d) {
      acc_t gm = am[d] == t ? (acc_t)dmax[d] : acc_t(0);
      dh[d] = (scalar_t)gm;
    }
  }
}

VGMR_CLONES void pool_bwd_row_f32(const float* dmean, const float* dmax, const int32_t* am, int32_t t, bool valid,
                                  int64_t n_b, int64_t D, float* dh) {
  pool_bwd_row_impl<float>(dmean, dmax, am, t, valid, n_b, D, dh);
}

template <typename scalar_t>
void pool_bwd_row(const scalar_t* dmean, const scalar_t* dmax, const int32_t* am, int32_t t, bool valid, int64_t n_b,
                  int64_t D, scalar_t* dh) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    pool_bwd_row_f32(dmean, dmax, am, t, valid, n_b, D, dh);
  } else {
    pool_bwd_row_impl<scalar_t>(dmean, dmax, am, t, valid, n_b, D, dh);
  }
}

void check_mask(const c10::optional<at::Tensor>& mask, int64_t B, int64_t T, const char* op) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK_VALUE(m.device().is_cpu(), op, ": mask must be a CPU tensor, got ", m.device());
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op, ": mask must be bool (True = valid step), got ",
                   m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == T, op, ": mask must have shape [B, T] = [", B,
                    ", ", T, "], got ", m.sizes());
  TORCH_CHECK_VALUE(m.is_contiguous(), op, ": mask must be contiguous");
}

}  // namespace

// Entry points (declared in csrc/cpu/cpu_common.h, registered in csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> summary_pool_cpu(const at::Tensor& h,
                                                                const c10::optional<at::Tensor>& mask) {
  const char* op = "vgmr::summary_pool";
  check_cpu_float(h, op, "h");
  checks::dim(h, 3, op, "h", "[B, T, D]");
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
  TORCH_CHECK_VALUE(T < (int64_t)std::numeric_limits<int32_t>::max(), op, ": T must fit the int32 argmax, got ",
                    T);
  check_mask(mask, B, T, op);
  at::Tensor mean = new_output({B, D}, h.options());
  at::Tensor mx = new_output({B, D}, h.options());
  at::Tensor arg = new_output({B, D}, h.options().dtype(at::kInt));
  if (B == 0 || D == 0) return {mean, mx, arg};
  const bool* mp = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  const int64_t nchunk = ceil_div(D, kDChunk);
  const int64_t tasks = B * nchunk;
  // grain: about 32K elements of h per task group
  const int64_t per_task = std::max<int64_t>(1, T * std::min<int64_t>(D, kDChunk));
  const int64_t grain = std::max<int64_t>(1, 32768 / per_task);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "vgmr_summary_pool", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* meanp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* maxp = mx.mutable_data_ptr<scalar_t>();
    int32_t* argp = arg.mutable_data_ptr<int32_t>();
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nchunk;
        const int64_t d0 = (task % nchunk) * kDChunk;
        const int64_t nd = std::min<int64_t>(kDChunk, D - d0);
        const int64_t o = b * D + d0;
        pool_chunk<scalar_t>(hp + b * T * D, mp ? mp + b * T : nullptr, T, D, d0, nd, meanp + o, maxp + o,
                             argp + o);
      }
    });
  });
  return {mean, mx, arg};
}

at::Tensor summary_pool_backward_cpu(const at::Tensor& dmean, const at::Tensor& dmax,
                                     const c10::optional<at::Tensor>& mask, const at::Tensor& argmax, int64_t T) {
  const char* op = "vgmr::summary_pool_backward";
  check_cpu_float(dmean, op, "dmean");
  check_cpu_float(dmax, op, "dmax");
  checks::dim(dmean, 2, op, "dmean", "[B, D]");
  checks::same_dtype(dmax, dmean, op, "dmax", "dmean");
  TORCH_CHECK_VALUE(dmax.sizes() == dmean.sizes(), op, ": dmax must have the shape of dmean ", dmean.sizes(),
                    ", got ", dmax.sizes());
  TORCH_CHECK_VALUE(argmax.device().is_cpu(), op, ": argmax must be a CPU tensor");
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kInt, op, ": argmax must be int32, got ", argmax.scalar_type());
  TORCH_CHECK_VALUE(argmax.sizes() == dmean.sizes(), op, ": argmax must have the shape of dmean ", dmean.sizes(),
                    ", got ", argmax.sizes());
  TORCH_CHECK_VALUE(argmax.is_contiguous(), op, ": argmax must be contiguous");
  TORCH_CHECK_VALUE(T >= 0 && T < (int64_t)std::numeric_limits<int32_t>::max(), op,
                    ": T must be a non-negative int32, got ", T);
  const int64_t B = dmean.size(0), D = dmean.size(1);
  check_mask(mask, B, T, op);
  at::Tensor dh = new_output({B, T, D}, dmean.options());
  if (B == 0 || T == 0 || D == 0) return dh;
  const bool* mp = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  // valid-step count per row (recomputed, not saved)
  std::vector<int64_t> counts(B, T);
  if (mp != nullptr) {
    for (int64_t b = 0; b < B; ++b) {
      int64_t c = 0;
      for (int64_t t = 0; t < T; ++t) c += mp[b * T + t] ? 1 : 0;
      counts[b] = c;
    }
  }
  const int64_t rows = B * T;
  const int64_t grain = std::max<int64_t>(1, 32768 / D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dmean.scalar_type(), "vgmr_summary_pool_backward", [&] {
    const scalar_t* dmeanp = dmean.const_data_ptr<scalar_t>();
    const scalar_t* dmaxp = dmax.const_data_ptr<scalar_t>();
    const int32_t* argp = argmax.const_data_ptr<int32_t>();
    scalar_t* dhp = dh.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / T, t = r % T;
        const bool valid = mp == nullptr || mp[r];
        pool_bwd_row<scalar_t>(dmeanp + b * D, dmaxp + b * D, argp + b * D, (int32_t)t, valid, counts[b], D,
                               dhp + r * D);
      }
    });
  });
  return dh;
}

}  // namespace cpu
}  // namespace vgmr
