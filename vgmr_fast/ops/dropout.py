"""The shared dropout stream for the op layer: :mod:`vgmr_fast.dropout_stream`, re-exported
(it lives in a leaf module so the reference imports it without loading the extension)."""
from ..dropout_stream import (  # noqa: F401
    check_p,
    check_seed,
    draw_seed,
    draw_seeds,
    keep_mask,
    philox4x32,
    seed_value,
    threshold,
)
from ..dropout_stream import _mulhilo  # noqa: F401  (tests of the stream use it)
