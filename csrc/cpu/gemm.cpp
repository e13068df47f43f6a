// gemm / gemm_into (docs/ops.md "The layer's GEMMs"): the fused layer's matrix products on CPU,
//   result = beta * c + alpha * a @ b      (2-D, or 3-D batched over the first dimension)
// through oneDNN's matmul primitive where it serves (float32, the dims non-empty, oneDNN enabled),
// ATen's GEMM otherwise. ATen sends float32 to MKL's sgemm, which on AMD EPYC (AVX-512) runs
// about half as fast as oneDNN's JIT kernels on the same shapes (docs/ops.md, "The layer's GEMMs");
// bfloat16 and float16 already go to oneDNN inside ATen.
//
// oneDNN is reached through at::native::mkldnn_matmul (result = beta * result + alpha * a @ b,
// any strides: inputs neither contiguous nor transposed are copied first, the result is written
// in place). libtorch_cpu exports it but ships no header for it, so it is looked up at run time:
// a torch built without oneDNN, or one that renamed it, leaves the ATen path, not a failed import.
#include "cpu_common.h"
#include "gemm.h"

#include <ATen/MemoryOverlap.h>
#include <dlfcn.h>

namespace vgmr {
namespace cpu {
namespace {

constexpr const char* kGemm = "vgmr::gemm";

using OneDnnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);

// (A torch built without oneDNN exports the name too, as a stub that throws: hasMKLDNN decides.)
OneDnnMatmul onednn_matmul() {
  static const OneDnnMatmul fn = at::hasMKLDNN() ? reinterpret_cast<OneDnnMatmul>(dlsym(
      RTLD_DEFAULT, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff")) : nullptr;
  return fn;
}

// The result's shape, after checking a and b: [M, N] or [batch, M, N].
std::vector<int64_t> result_shape(const at::Tensor& a, const at::Tensor& b) {
  checks::defined(a, kGemm, "a");
  checks::defined(b, kGemm, "b");
  TORCH_CHECK_VALUE(a.dim() == b.dim() && (a.dim() == 2 || a.dim() == 3), kGemm,
                    ": a and b must both be 2-D ([M, K], [K, N]) or both 3-D ([batch, M, K], [batch, K, N]), got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.size(-1) == b.size(-2), kGemm, ": a's columns must equal b's rows (K), got a ", a.sizes(),
                    " and b ", b.sizes());
  TORCH_CHECK_VALUE(a.dim() == 2 || a.size(0) == b.size(0), kGemm, ": a and b must have the same batch size, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), kGemm, ": a and b must have one dtype, got ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu(), kGemm, ": a and b must be CPU tensors");
  if (a.dim() == 2) return {a.size(0), b.size(1)};
  return {a.size(0), a.size(1), b.size(2)};
}

// One-row products stay ATen's: oneDNN's matmul (as torch 2.11 and 2.13 ship it) corrupts the heap
// or writes wrong values for a = [1, K] with b transposed and accumulation (beta != 0) at K = 2048
// (tests/ops/test_gemm.py); no other shape showed it in a randomised sweep of 1,000 (M >= 2).
bool onednn_serves(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0 &&
         a.size(-2) > 1 &&
         out.stride(-1) == 1 && at::globalContext().userEnabledMkldnn() && onednn_matmul() != nullptr;
}

}  // namespace

bool onednn_matmul_available() { return onednn_matmul() != nullptr; }

void gemm_into_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c,
                   double beta, double alpha) {
  const std::vector<int64_t> shape = result_shape(a, b);
  checks::defined(out, kGemm, "out");
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape), kGemm, ": out must have shape ", at::IntArrayRef(shape),
                    " (a @ b), got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == a.scalar_type(), kGemm, ": out must have a's dtype ", a.scalar_type(),
                   ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device().is_cpu(), kGemm, ": out must be a CPU tensor");
  at::assert_no_internal_overlap(out);  // (the written tensor shares no memory with itself, a or b)
  at::assert_no_overlap(out, a);
  at::assert_no_overlap(out, b);
  const bool has_c = c.has_value() && c->defined();
  if (has_c) {
    TORCH_CHECK_TYPE(c->scalar_type() == a.scalar_type(), kGemm, ": c must have a's dtype ", a.scalar_type(),
                     ", got ", c->scalar_type());
    TORCH_CHECK_VALUE(at::is_expandable_to(c->sizes(), out.sizes()), kGemm, ": c of shape ", c->sizes(),
                      " does not broadcast to the result's shape ", out.sizes());
  }
  if (onednn_serves(out, a, b)) {
    float accumulate = (float)beta;  // oneDNN reads out itself: c is first written into it
    if (has_c) {
      if (beta == 0.0) {
        accumulate = 0.0f;
      } else {
        out.copy_(c->expand_as(out));
        if (beta != 1.0) out.mul_(beta);
        accumulate = 1.0f;
      }
    }
    onednn_matmul()(a, b, out, accumulate, (float)alpha);
    return;
  }
  at::Tensor result = out;
  if (a.dim() == 2) {
    if (has_c) {
      at::addmm_out(result, *c, a, b, beta, alpha);
    } else {
      result.addmm_(a, b, beta, alpha);
    }
  } else if (has_c) {
    at::baddbmm_out(result, *c, a, b, beta, alpha);
  } else {
    result.baddbmm_(a, b, beta, alpha);
  }
}

at::Tensor gemm_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c, double beta,
                    double alpha) {
  at::Tensor out = at::empty(result_shape(a, b), a.options());
  const bool has_c = c.has_value() && c->defined();
  // without c the result starts from nothing: its fresh contents are never read
  gemm_into_cpu(out, a, b, c, has_c ? beta : 0.0, alpha);
  return out;
}

}  // namespace cpu
}  // namespace vgmr
