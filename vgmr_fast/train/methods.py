"""The methods of the training grid: refiners and balancers, and the options of ``vgmr``."""
from __future__ import annotations

from typing import Optional, Tuple

REFINERS = ("vgmr", "mlp", "gate", "cross_attention")
BALANCERS = ("ogm", "iibalance", "decision")
BACKBONES = ("concat", "transformer")


def parse_method(method: str) -> Tuple[Optional[str], Optional[str]]:
    """``"vgmr+ogm"`` → ``("vgmr", "ogm")``; ``"none"`` → ``(None, None)``."""
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    refiner = balancer = None
    for part in method.split("+"):
        part = part.strip().lower()
        if part in ("none", "plain", ""):
            continue
        if part.startswith(("vgmr@", "vgmr%")):
            vgmr_options(part, None)  # validates the options
            part = "vgmr"
        if part in REFINERS:
            if refiner is not None:
                raise ValueError(f"method {method!r}: at most one refiner ({REFINERS})")
            refiner = part
        elif part in BALANCERS:
            if balancer is not None:
                raise ValueError(f"method {method!r}: at most one balancer ({BALANCERS})")
            balancer = part
        else:
            raise ValueError(f"method {method!r}: unknown part {part!r} (refiners {REFINERS}, balancers {BALANCERS})")
    if refiner == "vgmr" and balancer in ("iibalance", "decision"):
        raise ValueError(f"method {method!r}: vgmr's value targets need the backbone's own head; "
                         f"combine vgmr with ogm only")
    return refiner, balancer


def vgmr_options(method: str, args) -> Tuple[float, int]:
    """``(value_fraction, value_every)`` of a method: ``vgmr@0.25`` sets the fraction, ``vgmr%4`` the
    period (``vgmr@0.5%2`` both); what a method leaves out comes from ``--value-fraction``/``--value-every``."""
    from ..objective import value_rows

    fraction, every = getattr(args, "value_fraction", 1.0), getattr(args, "value_every", 1)
    for part in method.split("+"):
        part = part.strip().lower()
        if not part.startswith(("vgmr@", "vgmr%")):
            continue
        rest, _, k = part[4:].partition("%")
        try:
            if rest:
                fraction = float(rest[1:])
                value_rows(1, fraction)
            if k:
                every = int(k)
                if every < 1:
                    raise ValueError
        except ValueError:
            raise ValueError(f"method {method!r}: expected vgmr@RHO (RHO in (0, 1]), vgmr%K (K an int >= 1) "
                             f"or vgmr@RHO%K") from None
    return fraction, every
