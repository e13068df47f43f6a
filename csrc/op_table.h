// The vgmr:: operators that every backend implements (schemas: vgmr_fast/schemas.py), listed once.
// Each backend registers its functions <op><suffix> (summary_pool_cpu, summary_pool_cuda,
// summary_pool_autograd, ...) from this list, so no backend can leave an operator out.
// Torch-free: a list of names.
#pragma once

#define VGMR_IMPL_OP(lib, op, suffix) lib.impl(#op, &op##suffix);

// The differentiable operators (the Autograd key registers these only).
#define VGMR_IMPL_FORWARD_OPS(lib, suffix)     \
  VGMR_IMPL_OP(lib, summary_pool, suffix)      \
  VGMR_IMPL_OP(lib, interaction, suffix)       \
  VGMR_IMPL_OP(lib, gate_norm, suffix)         \
  VGMR_IMPL_OP(lib, gate_norm_grouped, suffix)

// Forward and backward operators: what a kernel backend (CPU, CUDA) registers.
#define VGMR_IMPL_KERNEL_OPS(lib, suffix)                 \
  VGMR_IMPL_FORWARD_OPS(lib, suffix)                      \
  VGMR_IMPL_OP(lib, summary_pool_backward, suffix)        \
  VGMR_IMPL_OP(lib, interaction_backward, suffix)         \
  VGMR_IMPL_OP(lib, gate_norm_backward, suffix)           \
  VGMR_IMPL_OP(lib, gate_norm_grouped_backward, suffix)
