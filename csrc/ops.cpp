// vgmr_fast._C: the kernels of the vgmr:: operators (CPU: csrc/cpu/<op>.cpp; CUDA: csrc/cuda/,
// TORCH_LIBRARY_IMPL(vgmr, CUDA), built only with VGMR_WITH_CUDA; both from the one operator list
// of csrc/op_table.h), their C++ autograd, the CPU-only GEMMs of the fused layer (csrc/cpu/gemm.cpp),
// the small debug op philox_words, and the Python module itself (a plain CPython module: flags and
// the debug switch).
//
// Implementations only: the schemas are vgmr_fast/schemas.py's, which the op layer defines
// (torch.library, namespace vgmr) when it loads this module, so C++ and Python read one list.
// The dispatcher accepts implementations registered before their schema.
#include <ATen/FuncTorchTLS.h>
#include <Python.h>
#include <torch/autograd.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/gemm.h"
#include "op_checks.h"
#include "op_table.h"
#include "vgmr_math.h"

namespace vgmr {
namespace cpu {
std::atomic<bool> g_debug_nan_fill{false};
std::atomic<bool> g_force_narrow_simd{false};
}  // namespace cpu
}  // namespace vgmr

namespace {

// The debug op philox_words (schema: vgmr_fast/schemas.py DEBUG_SCHEMAS). CPU only.
at::Tensor philox_words_cpu(int64_t seed, const at::Tensor& counters) {
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kLong, "vgmr::philox_words: counters must be int64, got ",
                   counters.scalar_type());
  TORCH_CHECK_VALUE(counters.device().is_cpu(), "vgmr::philox_words: counters must be a CPU tensor");
  at::Tensor c = counters.contiguous();
  std::vector<int64_t> sizes(c.sizes().begin(), c.sizes().end());
  sizes.push_back(4);
  at::Tensor out = at::empty(sizes, c.options());
  const int64_t* cp = c.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const int64_t n = c.numel();
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      vgmr::U32x4 w = vgmr::philox4x32_10(vgmr::checks::philox_key(seed), (uint64_t)cp[i]);
      for (int k = 0; k < 4; ++k) op[4 * i + k] = (int64_t)w.w[k];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vgmr, CPU, m) {
  using namespace vgmr::cpu;
  m.impl("philox_words", &philox_words_cpu);
  m.impl("gemm", &gemm_cpu);
  m.impl("gemm_into", &gemm_into_cpu);
  VGMR_IMPL_KERNEL_OPS(m, _cpu)
}

// ---- autograd (every backend of namespace vgmr: CPU and CUDA) -------------------------------
// In C++ rather than torch.library.register_autograd: the Python autograd wrapper costs
// ~45 us per forward+backward, more than the kernels themselves at the module's small
// shapes. Same semantics as the Python registration used for vgmr_triton:: (docs/ops.md):
// save the inputs the backward recomputes from, call the <op>_backward operator.
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> vgmr_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// What the fused autograd does not support, said once, in the wording of the Python op layer
// (vgmr_fast.ops.backend.unsupported_message): name the op and point to the reference.
std::string unsupported(const char* op, const char* what) {
  const std::string name = std::string(op).substr(std::string(op).rfind(':') + 1);
  return std::string(op) + ": " + what + " is not supported by the fused kernels; use the plain-torch reference " +
         "(vgmr_fast.reference." + name + ", or VGMR(backend=\"reference\") for the module)";
}

// torch.func transforms and forward-mode AD: torch::autograd::Function supports neither, and
// its own error names no op. Checked before the forward runs (a TLS read when unused).
void check_transforms(const char* op, at::ArrayRef<at::Tensor> inputs) {
  const auto& functorch_tls = at::functorch::functorchTLSAccessor();
  if (functorch_tls) {
    bool ok = true;
    try {
      functorch_tls->checkSupportsCppAutogradFunction();
    } catch (const c10::Error&) {
      ok = false;
    }
    TORCH_CHECK(ok, unsupported(op, "torch.func (grad, vmap, jvp, jacrev, functional_call under a transform, ...)"));
  }
  for (const at::Tensor& t : inputs) {
    TORCH_CHECK(!t.defined() || !t._fw_grad(/*level=*/0).defined(),
                unsupported(op, "forward-mode AD (torch.autograd.forward_ad dual tensors)"));
  }
}

// The fused backward is not differentiable: when it runs with create_graph=True and would
// build a graph (an input of the backward requires grad), raise instead of returning wrong
// second derivatives.
void no_double_backward(const char* op, at::ArrayRef<at::Tensor> tensors) {
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(!t.defined() || !t.requires_grad(),
                unsupported(op, "double backward (torch.autograd.grad(..., create_graph=True), gradgradcheck, "
                                "gradient penalties)"));
  }
}

using Tuple3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tuple5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct SummaryPoolFn : public torch::autograd::Function<SummaryPoolFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const c10::optional<at::Tensor>& mask) {
    static auto op = vgmr_op<Tuple3(const at::Tensor&, const c10::optional<at::Tensor>&)>("vgmr::summary_pool");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [mean, mx, arg] = op.call(h, mask);
    ctx->saved_data["T"] = h.sym_size(1);
    ctx->saved_data["has_mask"] = mask.has_value();
    ctx->save_for_backward({arg, mask.has_value() ? *mask : at::Tensor()});
    ctx->mark_non_differentiable({arg});
    return {mean, mx, arg};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = vgmr_op<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                        const at::Tensor&, int64_t)>("vgmr::summary_pool_backward");
    auto saved = ctx->get_saved_variables();
    const at::Tensor& arg = saved[0];
    c10::optional<at::Tensor> mask;
    if (ctx->saved_data["has_mask"].toBool()) mask = saved[1];
    at::Tensor dmean = grads[0], dmax = grads[1];
    no_double_backward("vgmr::summary_pool", {dmean, dmax});
    if (!dmean.defined() && !dmax.defined()) return {at::Tensor(), at::Tensor()};
    if (!dmean.defined()) dmean = at::zeros_like(dmax);
    if (!dmax.defined()) dmax = at::zeros_like(dmean);
    if (dmax.scalar_type() != dmean.scalar_type()) dmax = dmax.to(dmean.scalar_type());
    const int64_t T = ctx->saved_data["T"].toSymInt().guard_int(__FILE__, __LINE__);
    return {op.call(dmean.contiguous(), dmax.contiguous(), mask, arg, T), at::Tensor()};
  }
};

struct InteractionFn : public torch::autograd::Function<InteractionFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s) {
    static auto op = vgmr_op<at::Tensor(const at::Tensor&)>("vgmr::interaction");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({s});
    return op.call(s);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = vgmr_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("vgmr::interaction_backward");
    if (!grads[0].defined()) return {at::Tensor()};
    auto saved = ctx->get_saved_variables();
    no_double_backward("vgmr::interaction", {grads[0], saved[0]});
    return {op.call(grads[0].contiguous(), saved[0])};
  }
};

struct GateNormFn : public torch::autograd::Function<GateNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& zpre, const at::Tensor& bias_row,
                               const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                               double alpha, double beta, double p, const at::Tensor& seed) {
    static auto op = vgmr_op<Tuple3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, double, double, double, const at::Tensor&)>("vgmr::gate_norm");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = op.call(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seed);
    // The seed tensor itself is saved (not its value): the backward kernel reads it from
    // memory like the forward, so nothing here synchronises with the device.
    ctx->save_for_backward({zpre, bias_row, x, ln_weight, mean, rstd, seed});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["p"] = p;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = vgmr_op<Tuple5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double,
                                    const at::Tensor&, bool)>("vgmr::gate_norm_backward");
    const at::Tensor none;
    if (!grads[0].defined()) return {none, none, none, none, none, none, none, none, none};
    auto s = ctx->get_saved_variables();
    at::Tensor dy = grads[0];
    no_double_backward("vgmr::gate_norm", {dy, s[0], s[1], s[2], s[3]});
    if (dy.scalar_type() != s[2].scalar_type()) dy = dy.to(s[2].scalar_type());
    const bool need_dx = ctx->needs_input_grad(2);
    auto [dzpre, dbias, dx, dw, db] =
        op.call(dy.contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["alpha"].toDouble(),
                ctx->saved_data["beta"].toDouble(), ctx->saved_data["p"].toDouble(), s[6], need_dx);
    return {dzpre, dbias, need_dx ? dx : none, dw, db, none, none, none, none};
  }
};

// Grouped gate_norm: one autograd node for all modalities. Inputs are flattened by
// torch::autograd::Function (each list element is one input), so the backward returns
// 5M gradients in list order, then none for alpha, beta, p and seeds.
using Tensors = std::vector<at::Tensor>;
using Lists3 = std::tuple<Tensors, Tensors, Tensors>;
using Lists5 = std::tuple<Tensors, Tensors, Tensors, Tensors, Tensors>;

struct GateNormGroupedFn : public torch::autograd::Function<GateNormGroupedFn> {
  static variable_list forward(AutogradContext* ctx, at::TensorList zpre, at::TensorList bias_row, at::TensorList x,
                               at::TensorList ln_weight, at::TensorList ln_bias, double alpha, double beta, double p,
                               const at::Tensor& seeds) {
    static auto op = vgmr_op<Lists3(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                    double, double, double, const at::Tensor&)>("vgmr::gate_norm_grouped");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = op.call(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seeds);
    const size_t M = x.size();
    variable_list saved;
    saved.reserve(6 * M + 1);
    for (at::TensorList l : {zpre, bias_row, x, ln_weight}) saved.insert(saved.end(), l.begin(), l.end());
    saved.insert(saved.end(), mean.begin(), mean.end());
    saved.insert(saved.end(), rstd.begin(), rstd.end());
    saved.push_back(seeds);
    ctx->save_for_backward(saved);
    ctx->saved_data["M"] = (int64_t)M;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["p"] = p;
    variable_list out;
    out.reserve(3 * M);
    out.insert(out.end(), y.begin(), y.end());
    out.insert(out.end(), mean.begin(), mean.end());
    out.insert(out.end(), rstd.begin(), rstd.end());
    ctx->mark_non_differentiable(variable_list(out.begin() + M, out.end()));
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = vgmr_op<Lists5(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                    at::TensorList, at::TensorList, double, double, double, const at::Tensor&,
                                    const std::optional<c10::List<bool>>&)>("vgmr::gate_norm_grouped_backward");
    const size_t M = (size_t)ctx->saved_data["M"].toInt();
    variable_list out(5 * M + 4);
    if (std::none_of(grads.begin(), grads.begin() + M, [](const at::Tensor& g) { return g.defined(); })) return out;
    auto s = ctx->get_saved_variables();
    auto part = [&](size_t k) { return Tensors(s.begin() + k * M, s.begin() + (k + 1) * M); };
    const Tensors zpre = part(0), bias_row = part(1), x = part(2), ln_weight = part(3), mean = part(4),
                  rstd = part(5);
    Tensors dy(M);
    for (size_t m = 0; m < M; ++m) {
      const at::Tensor& g = grads[m];
      // an unused output: zeros (its modality's input gradients are then zero, as in M separate ops)
      dy[m] = g.defined() ? (g.scalar_type() == x[m].scalar_type() ? g : g.to(x[m].scalar_type())).contiguous()
                          : at::zeros_like(x[m]);
    }
    no_double_backward("vgmr::gate_norm_grouped", dy);
    no_double_backward("vgmr::gate_norm_grouped", at::ArrayRef<at::Tensor>(s.data(), 4 * M));
    // inputs are flattened in list order: x[m] is input 2M + m
    c10::List<bool> need_dx;
    for (size_t m = 0; m < M; ++m) need_dx.push_back(ctx->needs_input_grad(2 * M + m));
    auto [dz, dbias, dx, dw, db] =
        op.call(dy, zpre, bias_row, x, ln_weight, mean, rstd, ctx->saved_data["alpha"].toDouble(),
                ctx->saved_data["beta"].toDouble(), ctx->saved_data["p"].toDouble(), s[6 * M], need_dx);
    for (size_t m = 0; m < M; ++m) {
      out[m] = dz[m];
      out[M + m] = dbias[m];
      if (need_dx.get(m)) out[2 * M + m] = dx[m];
      out[3 * M + m] = dw[m];
      out[4 * M + m] = db[m];
    }
    return out;
  }
};

Lists3 gate_norm_grouped_autograd(at::TensorList zpre, at::TensorList bias_row, at::TensorList x,
                                  at::TensorList ln_weight, at::TensorList ln_bias, double alpha, double beta,
                                  double p, const at::Tensor& seeds) {
  std::vector<at::Tensor> inputs;
  for (at::TensorList l : {zpre, bias_row, x, ln_weight, ln_bias}) inputs.insert(inputs.end(), l.begin(), l.end());
  check_transforms("vgmr::gate_norm_grouped", inputs);
  auto out = GateNormGroupedFn::apply(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seeds);
  const size_t M = x.size();
  return {Tensors(out.begin(), out.begin() + M), Tensors(out.begin() + M, out.begin() + 2 * M),
          Tensors(out.begin() + 2 * M, out.end())};
}

Tuple3 summary_pool_autograd(const at::Tensor& h, const c10::optional<at::Tensor>& mask) {
  check_transforms("vgmr::summary_pool", {h});
  auto out = SummaryPoolFn::apply(h, mask);
  return {out[0], out[1], out[2]};
}

at::Tensor interaction_autograd(const at::Tensor& s) {
  check_transforms("vgmr::interaction", {s});
  return InteractionFn::apply(s);
}

Tuple3 gate_norm_autograd(const at::Tensor& zpre, const at::Tensor& bias_row, const at::Tensor& x,
                          const at::Tensor& ln_weight, const at::Tensor& ln_bias, double alpha, double beta, double p,
                          const at::Tensor& seed) {
  check_transforms("vgmr::gate_norm", {zpre, bias_row, x, ln_weight, ln_bias});
  auto out = GateNormFn::apply(zpre, bias_row, x, ln_weight, ln_bias, alpha, beta, p, seed);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vgmr, Autograd, m) { VGMR_IMPL_FORWARD_OPS(m, _autograd) }

// ---- the Python module --------------------------------------------------------------
extern "C" {

static PyObject* vgmr_set_debug_nan_fill(PyObject*, PyObject* arg) {
  int v = PyObject_IsTrue(arg);
  if (v < 0) return nullptr;
  bool old = vgmr::cpu::g_debug_nan_fill.exchange(v != 0);
  return PyBool_FromLong(old);
}

static PyObject* vgmr_set_force_narrow_simd(PyObject*, PyObject* arg) {
  int v = PyObject_IsTrue(arg);
  if (v < 0) return nullptr;
  bool old = vgmr::cpu::g_force_narrow_simd.exchange(v != 0);
  return PyBool_FromLong(old);
}

static PyObject* vgmr_get_debug_nan_fill(PyObject*, PyObject*) {
  return PyBool_FromLong(vgmr::cpu::g_debug_nan_fill.load());
}

// Threads the kernels' at::parallel_for will use (ATen's intra-op pool).
static PyObject* vgmr_num_threads(PyObject*, PyObject*) { return PyLong_FromLong(at::get_num_threads()); }

static PyMethodDef vgmr_methods[] = {
    {"set_debug_nan_fill", vgmr_set_debug_nan_fill, METH_O,
     "set_debug_nan_fill(on) -> previous: fill kernel outputs with NaN before writing (tests)."},
    {"get_debug_nan_fill", vgmr_get_debug_nan_fill, METH_NOARGS, "Whether debug NaN fill is on."},
    {"set_force_narrow_simd", vgmr_set_force_narrow_simd, METH_O,
     "set_force_narrow_simd(on) -> previous: use the 8-lane (AVX2/baseline) CPU kernels even on AVX-512 (tests)."},
    {"num_threads", vgmr_num_threads, METH_NOARGS, "at::get_num_threads() as seen by the extension."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef vgmr_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "vgmr_fast._C: the vgmr:: operators (torch.ops.vgmr) and build flags.",
                                         -1, vgmr_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&vgmr_module);
  if (mod == nullptr) return nullptr;
#ifdef VGMR_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
#ifdef _OPENMP
  const long with_openmp = 1;
#else
  const long with_openmp = 0;
#endif
  if (PyModule_AddObject(mod, "WITH_CUDA", PyBool_FromLong(with_cuda)) < 0 ||
      PyModule_AddObject(mod, "WITH_OPENMP", PyBool_FromLong(with_openmp)) < 0 ||
      PyModule_AddObject(mod, "CPP_AUTOGRAD", PyBool_FromLong(1)) < 0 ||
      PyModule_AddObject(mod, "ONEDNN_MATMUL", PyBool_FromLong(vgmr::cpu::onednn_matmul_available())) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}

}  // extern "C"
