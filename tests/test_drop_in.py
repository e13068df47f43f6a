"""What the README's drop-in paragraph says of the fused VGMR against the reference, checked at the
README's own sizes: the same state_dict, loadable from either layout, and stacked parameters
(24 tensors against 78, the same numbers) whose gradients map back to the reference's."""
import torch

import vgmr_fast
from vgmr_fast.reference import VGMR as ReferenceVGMR

WIDTHS = {"text": 768, "audio": 74, "vision": 35}


def _pair():
    torch.manual_seed(0)
    ref = ReferenceVGMR(WIDTHS, d=128)
    torch.manual_seed(0)
    fused = vgmr_fast.VGMR(WIDTHS, d=128, backend="reference")
    return ref, fused


def test_state_dict_is_the_reference_and_parameters_are_stacked():
    ref, fused = _pair()
    a, b = ref.state_dict(), fused.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(ref.parameters())) == 78 and len(list(fused.parameters())) == 24
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in fused.parameters()) == 1630635


def test_load_state_dict_takes_either_layout():
    ref, fused = _pair()
    other = vgmr_fast.VGMR(WIDTHS, d=128, backend="reference")
    other.load_state_dict(ref.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), fused.parameters()))
    again = vgmr_fast.VGMR(WIDTHS, d=128, backend="reference")
    again.load_state_dict({n: p.detach().clone() for n, p in fused.named_parameters()})
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), fused.parameters()))


def test_reference_grads_are_keyed_and_shaped_as_the_reference():
    ref, fused = _pair()
    ref.eval(), fused.eval()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, D, dtype=torch.float64, generator=g) for D in WIDTHS.values()]
    ref.double(), fused.double()
    sum(o.sum() for o in ref(xs)).backward()
    sum(o.sum() for o in fused(xs)).backward()
    mapped = fused.reference_grads()
    named = dict(ref.named_parameters())
    assert set(mapped) == set(named)
    for key, grad in mapped.items():
        torch.testing.assert_close(grad, named[key].grad, msg=key)
