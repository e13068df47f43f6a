"""The fused ops of VGMR (docs/ops.md): one public function per op, one backend choice.

- :func:`summary_pool` ``(h, mask=None) -> (mean, max)`` (docs/math.md §1)
- :func:`interaction` ``(s) -> u`` (docs/math.md §2)
- :func:`gate_norm` ``(zpre, bias_row, x, ln_weight, ln_bias, *, alpha, beta, p, seed) -> y`` (docs/math.md §5)
- :func:`gate_norm_grouped` ``(zpres, bias_rows, xs, ln_weights, ln_biases, *, alpha, beta, p, seeds) -> ys``
  (every modality in one call)

Each takes ``backend="auto" | "cpu" | "cuda" | "triton"`` (see :mod:`.backend`). Importing this
package loads ``vgmr_fast._C`` when it is built (the ``torch.ops.vgmr`` operators) but never
requires it: the pure-torch dropout stream (:mod:`.dropout`) works without it.
"""
from . import backend, dropout  # noqa: F401  (backend loads vgmr_fast._C defensively)
from .backend import BACKENDS, GPU_AUTO, available_backends, resolve  # noqa: F401
from .gate_norm import gate_norm, gate_norm_grouped
from .interaction import interaction
from .summary_pool import summary_pool

__all__ = [
    "summary_pool",
    "interaction",
    "gate_norm",
    "gate_norm_grouped",
    "backend",
    "dropout",
    "BACKENDS",
    "GPU_AUTO",
    "resolve",
    "available_backends",
]
