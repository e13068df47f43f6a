"""What the Triton tests share: device and dtypes. The pass rule is vgmr_fast.testing's (the one
tests/helpers.py and ``vgmr-fast check`` apply), plus one bf16 ulp under the interpreter."""
import torch

import vgmr_fast.triton as VT
from vgmr_fast import testing

DEVICE = "cpu" if VT.INTERPRET else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(name, out, truth, eager, dtype):
    """``out`` (computed in ``dtype``) against the float64 ``truth`` and the eager run ``eager``."""
    slack = testing.interp_bf16_slack(truth) if VT.INTERPRET and out.dtype == torch.bfloat16 else 0.0
    c = testing.compare(out, eager, truth, dtype, slack=slack)
    assert c.ok, f"{name}: {c.note or 'error %.3e > bound %.3e' % (c.err, c.tol)} ({testing.RULE})"
