"""The operator schemas of docs/ops.md, written once for both namespaces.

``vgmr::`` (the C++ kernels of ``vgmr_fast._C``, which registers only implementations) is defined
from :data:`SCHEMAS` and :data:`DEBUG_SCHEMAS` by the op layer when it loads the extension;
``vgmr_triton::`` (``vgmr_fast.triton``) from :data:`SCHEMAS`, with ``int`` read as ``SymInt``
(:func:`triton_schema`): a size argument may stay symbolic while torch.compile traces the
Triton launcher's Python body, where the C++ kernels take a concrete ``int64_t``.

A leaf below the op layer and the Triton package (torch is imported only by :func:`define`), so
either imports it without loading the other.
"""
from __future__ import annotations

#: Every backend's operators: name -> schema (arguments and named results).
SCHEMAS = {
    "summary_pool": "(Tensor h, Tensor? mask) -> (Tensor mean, Tensor max, Tensor argmax)",
    "summary_pool_backward": "(Tensor dmean, Tensor dmax, Tensor? mask, Tensor argmax, int T) -> Tensor",
    "interaction": "(Tensor s) -> Tensor",
    "interaction_backward": "(Tensor du, Tensor s) -> Tensor",
    "gate_norm": (
        "(Tensor zpre, Tensor bias_row, Tensor x, Tensor ln_weight, Tensor ln_bias, "
        "float alpha, float beta, float p, Tensor seed) -> (Tensor y, Tensor mean, Tensor rstd)"
    ),
    "gate_norm_backward": (
        "(Tensor dy, Tensor zpre, Tensor bias_row, Tensor x, Tensor ln_weight, Tensor mean, Tensor rstd, "
        "float alpha, float beta, float p, Tensor seed, bool need_dx=True) "
        "-> (Tensor dzpre, Tensor dbias_row, Tensor dx, Tensor dln_weight, Tensor dln_bias)"
    ),
    # All modalities in one call (docs/ops.md): modality m is gate_norm(..., seed = seeds[m]).
    "gate_norm_grouped": (
        "(Tensor[] zpre, Tensor[] bias_row, Tensor[] x, Tensor[] ln_weight, Tensor[] ln_bias, "
        "float alpha, float beta, float p, Tensor seeds) -> (Tensor[] y, Tensor[] mean, Tensor[] rstd)"
    ),
    "gate_norm_grouped_backward": (
        "(Tensor[] dy, Tensor[] zpre, Tensor[] bias_row, Tensor[] x, Tensor[] ln_weight, Tensor[] mean, "
        "Tensor[] rstd, float alpha, float beta, float p, Tensor seeds, bool[]? need_dx=None) "
        "-> (Tensor[] dzpre, Tensor[] dbias_row, Tensor[] dx, Tensor[] dln_weight, Tensor[] dln_bias)"
    ),
}

#: The operators with a Triton kernel (the grouped ones run as M one-modality calls there).
TRITON_OPS = ("summary_pool", "summary_pool_backward", "interaction", "interaction_backward", "gate_norm",
              "gate_norm_backward")

#: CPU-only operators of ``vgmr::``: the fused layer's matrix products (csrc/cpu/gemm.cpp: oneDNN's
#: matmul for float32, ATen's GEMM otherwise), ``beta * c + alpha * a @ b`` for 2-D or 3-D (batched)
#: ``a``, ``b``, ``c`` broadcast to the result. ``gemm`` returns a new tensor (no ``c``: zero);
#: ``gemm_into`` writes ``out``, with ``c`` = ``out`` itself when absent (``beta = 0``: ``out`` is
#: only written). Other devices use ATen's GEMM directly (vgmr_fast/ops/gemm.py).
CPU_SCHEMAS = {
    "gemm": "(Tensor a, Tensor b, Tensor? c=None, float beta=1.0, float alpha=1.0) -> Tensor",
    "gemm_into": "(Tensor(a!) out, Tensor a, Tensor b, Tensor? c=None, float beta=1.0, float alpha=1.0) -> ()",
}

#: Debug/test operators of ``vgmr::`` only (CPU kernels): the Philox4x32-10 words of
#: csrc/vgmr_math.h for int64 counters (``[...] -> [..., 4]``, int64 holding uint32 values;
#: ``seed``'s 64 bits are the key).
DEBUG_SCHEMAS = {
    "philox_words": "(int seed, Tensor counters) -> Tensor",
}


def triton_schema(name: str) -> str:
    """``vgmr_triton::<name>``'s schema: :data:`SCHEMAS`' with ``int`` arguments as ``SymInt``."""
    return SCHEMAS[name].replace("int ", "SymInt ")


def define(namespace: str, schemas: dict[str, str]):
    """Define ``<namespace>::<name><schema>`` for every entry, tagged pt2_compliant; returns the
    ``torch.library.Library`` that owns the definitions (keep it alive: dropping it removes them)."""
    import torch

    lib = torch.library.Library(namespace, "DEF")
    for name, schema in schemas.items():
        lib.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    return lib
