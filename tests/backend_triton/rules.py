"""What the Triton tests share: device, dtypes and the CONVENTIONS test rule."""
import torch

import vgmr_fast.triton as VT

DEVICE = "cpu" if VT.INTERPRET else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def atol_for(dtype):
    return 1e-6 if dtype == torch.float32 else 1e-3

def interp_slack(out_dtype, truth):
    """One bf16 ulp of the truth under the interpreter, whose fp32 -> bf16 cast truncates
    (on a GPU ``.to(tl.bfloat16)`` rounds to nearest even and the plain rule applies)."""
    if VT.INTERPRET and out_dtype == torch.bfloat16:
        return torch.exp2(torch.floor(torch.log2(truth.abs().clamp_min(2.0**-126))) - 7)
    return torch.zeros_like(truth)

def check(name, out, truth, eager, dtype):
    """The test rule: |out - truth| <= 2 max|eager - truth| + atol(dtype of the inputs)."""
    out_dtype = out.dtype
    out, truth, eager = (t.detach().double().cpu() for t in (out, truth, eager))
    assert out.shape == truth.shape, name
    assert not torch.isnan(out).any(), f"{name}: NaN (unwritten or broken) elements"
    err = (out - truth).abs()
    bound = 2 * (eager - truth).abs().max().item() + atol_for(dtype)
    excess = err - bound - interp_slack(out_dtype, truth)
    assert (excess <= 0).all(), (
        f"{name}: max error {err.max().item():.3e} > bound {bound:.3e} (worst excess {excess.max().item():.3e})")
