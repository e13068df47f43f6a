// gate_norm's four operator entry points (docs/ops.md), written once over a backend's
// one-modality forward and backward (csrc/cpu/gate_norm.cpp, csrc/cuda/binding.cpp):
//   One(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seed, op) -> (y, mean, rstd)
//   BackwardOne(dy, zpre, bias_row, x, ln_weight, mean, rstd, alpha, beta, p, seed, need_dx, op)
//       -> (dzpre, dbias_row, dx, dln_weight, dln_bias); dx is an empty tensor when !need_dx
//   CheckDevice(t, op, name): t is on the backend's device (before the seed is read)
//   CheckModality(x_m, x_0, opm): modality m's x may run next to modality 0's
// `seed` points at the modality's int64 key; a grouped call runs modality m exactly as
// gate_norm(..., seed = seeds[m]), so its results are bit-identical to M separate calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "op_checks.h"

namespace vgmr {

using Tensors = std::vector<at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <auto One, auto BackwardOne, auto CheckDevice, auto CheckModality>
struct GateNormEntries {
  static Tensors3 forward(const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x,
                          const at::Tensor& ln_weight, const at::Tensor& ln_bias, double alpha, double beta, double p,
                          const at::Tensor& seed) {
    const char* op = "vgmr::gate_norm";
    CheckDevice(x, op, "x");
    checks::seed_tensor(seed, x, op, "x");
    return One(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seed.const_data_ptr<int64_t>(), op);
  }

  static Tensors5 backward(const at::Tensor& dy, const at::Tensor& zpre, const at::Tensor& bias_row,
                           const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& mean,
                           const at::Tensor& rstd, double alpha, double beta, double p, const at::Tensor& seed,
                           bool need_dx) {
    const char* op = "vgmr::gate_norm_backward";
    CheckDevice(x, op, "x");
    checks::seed_tensor(seed, x, op, "x");
    return BackwardOne(dy, zpre, bias_row, x, ln_weight, mean, rstd, alpha, beta, p, seed.const_data_ptr<int64_t>(),
                       need_dx, op);
  }

  static std::tuple<Tensors, Tensors, Tensors> grouped(at::TensorList zpre, at::TensorList bias_row,
                                                       at::TensorList x, at::TensorList ln_weight,
                                                       at::TensorList ln_bias, double alpha, double beta, double p,
                                                       const at::Tensor& seeds) {
    const char* op = "vgmr::gate_norm_grouped";
    const size_t M = checks::grouped_count(
        {{x, "x"}, {zpre, "zpre"}, {bias_row, "bias_row"}, {ln_weight, "ln_weight"}, {ln_bias, "ln_bias"}}, seeds, op);
    CheckDevice(seeds, op, "seeds");
    const int64_t* sp = seeds.const_data_ptr<int64_t>();
    Tensors y(M), mean(M), rstd(M);
    for (size_t m = 0; m < M; ++m) {
      const std::string opm = checks::modality_op(op, m);
      CheckModality(x[m], x[0], opm.c_str());
      checks::same_batch(x[m], x[0], opm);
      std::tie(y[m], mean[m], rstd[m]) =
          One(zpre[m], bias_row[m], x[m], ln_weight[m], ln_bias[m], alpha, beta, p, sp + m, opm.c_str());
    }
    return {y, mean, rstd};
  }

  static std::tuple<Tensors, Tensors, Tensors, Tensors, Tensors> grouped_backward(
      at::TensorList dy, at::TensorList zpre, at::TensorList bias_row, at::TensorList x, at::TensorList ln_weight,
      at::TensorList mean, at::TensorList rstd, double alpha, double beta, double p, const at::Tensor& seeds,
      const std::optional<c10::List<bool>>& need_dx) {
    const char* op = "vgmr::gate_norm_grouped_backward";
    const size_t M = checks::grouped_count({{x, "x"}, {dy, "dy"}, {zpre, "zpre"}, {bias_row, "bias_row"},
                                            {ln_weight, "ln_weight"}, {mean, "mean"}, {rstd, "rstd"}},
                                           seeds, op);
    TORCH_CHECK_VALUE(!need_dx.has_value() || need_dx->size() == M, op, ": need_dx must have one entry per modality (",
                      M, "), got ", need_dx.has_value() ? need_dx->size() : 0);
    CheckDevice(seeds, op, "seeds");
    const int64_t* sp = seeds.const_data_ptr<int64_t>();
    Tensors dz(M), dbias(M), dx(M), dw(M), db(M);
    for (size_t m = 0; m < M; ++m) {
      const std::string opm = checks::modality_op(op, m);
      CheckModality(x[m], x[0], opm.c_str());
      checks::same_batch(x[m], x[0], opm);
      std::tie(dz[m], dbias[m], dx[m], dw[m], db[m]) = BackwardOne(
          dy[m], zpre[m], bias_row[m], x[m], ln_weight[m], mean[m], rstd[m], alpha, beta, p, sp + m,
          !need_dx.has_value() || need_dx->get(m), opm.c_str());
    }
    return {dz, dbias, dx, dw, db};
  }
};

}  // namespace vgmr
