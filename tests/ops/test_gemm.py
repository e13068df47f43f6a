"""The fused layer's GEMMs (vgmr_fast/ops/gemm.py, csrc/cpu/gemm.cpp) against ATen's and float64 truth:
every shape and argument form the layer uses (2-D and batched, transposed and sliced operands,
strided outputs, the broadcast addend, accumulation), every dtype, the routing, and bad input."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close_to_truth, gen
from vgmr_fast.ops import backend
from vgmr_fast.ops import gemm as G

pytestmark = pytest.mark.skipif(not backend.has_cpp(), reason=f"vgmr_fast._C not built: {backend.cpp_error()}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
ids = lambda d: str(d).split(".")[-1]  # noqa: E731


def _aten(out, a, b, c, beta, alpha):
    """The same value through ATen (``out`` None: a new tensor)."""
    two = a.dim() == 2
    if out is None:
        if c is None:
            return (torch.mm(a, b) if two else torch.bmm(a, b)) * alpha
        return (torch.addmm if two else torch.baddbmm)(c, a, b, beta=beta, alpha=alpha)
    base = out if c is None else c.expand_as(out)
    return base * beta + alpha * (torch.mm(a, b) if two else torch.bmm(a, b))


def _operands(batch, M, K, N, layout, dtype, seed):
    """a [.., M, K], b [.., K, N] in the layouts the layer passes: contiguous, transposed views of
    contiguous tensors (``x w^T``), and column slices of a wider weight (``w[:, :k]``)."""
    g = gen(seed)
    lead = (batch,) if batch else ()
    if layout == "contiguous":
        a, b = torch.randn(*lead, M, K, generator=g), torch.randn(*lead, K, N, generator=g)
    elif layout == "transposed":
        a, b = torch.randn(*lead, K, M, generator=g).transpose(-1, -2), torch.randn(*lead, N, K, generator=g).transpose(-1, -2)
    else:  # sliced
        a, b = torch.randn(*lead, M, K + 3, generator=g)[..., :K], torch.randn(*lead, K, N + 5, generator=g)[..., 2:N + 2]
    return a.to(dtype), b.to(dtype)


@pytest.mark.usefixtures("vgmr_debug_nan_fill")
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("batch,M,K,N", [(0, 1600, 768, 128), (0, 97, 75, 35), (3, 130, 128, 129), (0, 1, 7, 3),
                                         (2, 1, 2048, 600)])
@pytest.mark.parametrize("form", ["new", "new+c", "into", "into+c", "accumulate"])
@pytest.mark.parametrize("via", ["route", "op"])  # the layer's routing, or the operator itself (any size, dtype)
def test_matches_aten_and_truth(dtype, layout, batch, M, K, N, form, via):
    gemm, gemm_into = (G.gemm, G.gemm_into) if via == "route" else (torch.ops.vgmr.gemm, torch.ops.vgmr.gemm_into)
    a, b = _operands(batch, M, K, N, layout, dtype, seed=M + K + N)
    lead = (batch,) if batch else ()
    g = gen(7)
    c = torch.randn(*lead, 1, N, generator=g).to(dtype) if form.endswith("+c") else None
    beta, alpha = (0.5, 0.25) if form != "into" else (0.0, 2.0)
    start = torch.randn(*lead, M, N, generator=g).to(dtype)
    if form.startswith("new"):
        out = gemm(a, b, c, beta=beta, alpha=alpha)
        eager = _aten(None, a, b, c, beta, alpha)
        truth = _aten(None, a.double(), b.double(), None if c is None else c.double(), beta, alpha)
    else:
        # "into": out holds NaN (beta = 0 must not read it); otherwise out's own values are the addend
        dest = torch.full_like(start, float("nan")) if form == "into" else start.clone()
        out = gemm_into(dest, a, b, c, beta=beta, alpha=alpha)
        out = dest
        base = start if form == "accumulate" else None
        eager = _aten(base, a, b, c, beta, alpha) if base is not None else _aten(None, a, b, c, beta, alpha)
        truth = (_aten(start.double(), a.double(), b.double(), None, beta, alpha) if base is not None
                 else _aten(None, a.double(), b.double(), None if c is None else c.double(), beta, alpha))
    assert out.dtype == dtype
    assert_close_to_truth(out, eager, truth, dtype, name=f"gemm {form}")


def test_strided_output_is_written_in_place():
    """A column block of a wider buffer (how the backward gathers weight gradients): written
    where it lies, its neighbours untouched."""
    a, b = torch.randn(1600, 768, generator=gen(1)), torch.randn(768, 768, generator=gen(2))
    wide = torch.zeros(1600, 896)
    G.gemm_into(wide[:, 128:], a, b, beta=0.0)
    assert wide[:, :128].count_nonzero() == 0
    assert_close_to_truth(wide[:, 128:], a @ b, a.double() @ b.double(), torch.float32, name="strided out")


def test_float32_layer_sizes_run_on_onednn_and_small_ones_on_aten():
    """The route: a float32 GEMM of at least MIN_ONEDNN_MACS multiply-adds is vgmr::gemm (oneDNN when
    torch has it); smaller ones, other dtypes and calls that record gradients are ATen's."""
    from vgmr_fast.bench.opcount import count_aten_ops

    big, small = torch.randn(1600, 768), torch.randn(4, 8)
    _, c = count_aten_ops(G.gemm, big, torch.randn(768, 128))
    assert dict(c.by_name) == ({"vgmr::gemm": 1} if G.onednn_active() else {"aten::mm": 1})
    _, c = count_aten_ops(G.gemm, small, torch.randn(8, 3))
    assert dict(c.by_name) == {"aten::mm": 1}
    _, c = count_aten_ops(G.gemm, big.double(), torch.randn(768, 128).double())
    assert dict(c.by_name) == {"aten::mm": 1}
    w = torch.randn(768, 128, requires_grad=True)
    out, c = count_aten_ops(G.gemm, big, w)
    assert dict(c.by_name) == {"aten::mm": 1} and out.requires_grad
    with G.use_onednn(False):
        _, c = count_aten_ops(G.gemm, big, torch.randn(768, 128))
    assert dict(c.by_name) == {"aten::mm": 1}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch is built without oneDNN")
def test_onednn_matmul_is_found_where_torch_has_onednn():
    assert backend.has_onednn_matmul(), (
        "at::native::mkldnn_matmul was not found in libtorch_cpu: the layer's float32 CPU GEMMs run on ATen's")


def test_out_sharing_memory_with_an_operand_is_an_error():
    a = torch.randn(64, 64)
    with pytest.raises(RuntimeError, match="memory location"):
        torch.ops.vgmr.gemm_into(a, a, torch.randn(64, 64))
    with pytest.raises(RuntimeError, match="memory location"):
        torch.ops.vgmr.gemm_into(torch.randn(4, 1).expand(4, 3), torch.randn(4, 5), torch.randn(5, 3))


def test_onednn_disabled_by_torch_falls_back_to_aten_bit_for_bit():
    a, b = torch.randn(300, 700, generator=gen(3)), torch.randn(700, 200, generator=gen(4))
    with torch.backends.mkldnn.flags(enabled=False):
        out = torch.ops.vgmr.gemm(a, b, None, 1.0, 1.0)
    assert torch.equal(out, torch.mm(a, b))


def test_empty_dimensions():
    for a, b in ((torch.randn(0, 5), torch.randn(5, 3)), (torch.randn(4, 0), torch.randn(0, 3)),
                 (torch.randn(2, 0, 5), torch.randn(2, 5, 3))):
        out = torch.ops.vgmr.gemm(a, b, None, 1.0, 1.0)
        assert torch.equal(out, a @ b)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(4, 5), torch.randn(6, 3)), "a's columns must equal b's rows"),
    ((torch.randn(4, 5), torch.randn(2, 5, 3)), "must both be 2-D"),
    ((torch.randn(2, 4, 5), torch.randn(3, 5, 3)), "same batch size"),
    ((torch.randn(4), torch.randn(4)), "must both be 2-D"),
    ((torch.randn(4, 5), torch.randn(5, 3), torch.randn(2, 3)), "does not broadcast"),
])
def test_bad_input_names_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.vgmr.gemm(*args)


def test_bad_dtype_and_out_name_the_argument():
    with pytest.raises(TypeError, match="one dtype"):
        torch.ops.vgmr.gemm(torch.randn(4, 5), torch.randn(5, 3).double())
    with pytest.raises(ValueError, match="out must have shape"):
        torch.ops.vgmr.gemm_into(torch.empty(4, 4), torch.randn(4, 5), torch.randn(5, 3))
    with pytest.raises(TypeError, match="out must have a's dtype"):
        torch.ops.vgmr.gemm_into(torch.empty(4, 3).double(), torch.randn(4, 5), torch.randn(5, 3))
