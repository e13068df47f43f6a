// The layer's GEMMs on CPU (csrc/cpu/gemm.cpp): vgmr::gemm and vgmr::gemm_into.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace vgmr {
namespace cpu {

// Whether oneDNN's matmul was found in libtorch_cpu (float32 GEMMs then run there).
bool onednn_matmul_available();

// out = beta * c + alpha * a @ b, with c = out itself when absent (beta = 0: out is only written).
void gemm_into_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c,
                   double beta, double alpha);

// beta * c + alpha * a @ b in a new tensor (c absent: alpha * a @ b).
at::Tensor gemm_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c, double beta,
                    double alpha);

}  // namespace cpu
}  // namespace vgmr
