"""The Triton Philox4x32-10 (vgmr_fast/triton/philox.py) against the test vectors of docs/backends.md
and the pure-torch stream vgmr_fast.ops.dropout (keep_mask bit for bit), including 64-bit
seeds and counters >= 2**32."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vgmr_fast.triton as VT
from vgmr_fast.ops import dropout

pytestmark = pytest.mark.skipif(not VT.AVAILABLE, reason=f"Triton unavailable: {VT.unavailable_reason()}")

DEVICE = "cpu" if VT.INTERPRET else "cuda"

VECTORS = [
    (0, 0, "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),  # Random123's known answer
    (20261123, 1, "0d8a7843 ac11ed5b b0f47b0b 0bb6ecae"),
    (20261123, 4294967301, "471d3993 69eba11b 5ffea423 62485b0b"),
    (1099511627779, 1000003, "49bbbe9f aed87e2c 4aba550d 013c58ef"),
]


@pytest.mark.parametrize("seed,counter,words", VECTORS)
def test_vectors(seed, counter, words):
    from vgmr_fast.triton.philox import philox_words

    got = philox_words(seed, torch.tensor([counter], device=DEVICE))[0].tolist()
    assert " ".join(f"{w:08x}" for w in got) == words


def test_matches_torch_stream_on_many_counters():
    from vgmr_fast.triton.philox import philox_words

    g = torch.Generator().manual_seed(0)
    counters = torch.cat([
        torch.arange(0, 64),
        torch.randint(0, 2**62, (64,), generator=g),
        torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1]),
    ])
    for seed in (0, 1, 2**32 - 1, 2**32, 1099511627779, 2**63 - 1):
        got = philox_words(seed, counters.to(DEVICE)).cpu()
        assert torch.equal(got, dropout.philox4x32(seed, counters)), seed


def test_keep_mask_vector():
    from vgmr_fast.triton.philox import keep_mask

    expect = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(keep_mask(20261123, 3, 6, 0.5, device=DEVICE).cpu(), expect)


@pytest.mark.parametrize("block_d", [None, 4, 8, 16])
@pytest.mark.parametrize("R,D", [(5, 1), (3, 3), (4, 35), (2, 74), (3, 130)])
def test_keep_mask_equals_torch(R, D, block_d):
    # block_d < D: the column-chunked draw (as the tiled gate_norm paths do) gives the same mask
    from vgmr_fast.triton.philox import keep_mask

    for seed, p in [(0, 0.5), (1099511627779, 0.1), (2**62 + 5, 0.9)]:
        got = keep_mask(seed, R, D, p, device=DEVICE, block_d=block_d).cpu()
        assert torch.equal(got, dropout.keep_mask(seed, R, D, p)), (seed, p)


def test_keep_mask_counters_beyond_32_bits():
    # rows whose counters r * ceil(D/4) + c//4 cross 2**32 (tensors with > 2**34 elements)
    from vgmr_fast.triton.philox import keep_mask

    D, p, seed = 74, 0.3, 1099511627779
    per_row = (D + 3) // 4
    row0 = 2**32 // per_row - 2
    R = 4
    got = keep_mask(seed, R, D, p, device=DEVICE, row0=row0, block_d=16).cpu()
    rows = torch.arange(row0, row0 + R)
    c = torch.arange(D)
    counters = rows[:, None] * per_row + (c // 4)[None, :]
    assert counters.min() < 2**32 <= counters.max()
    words = dropout.philox4x32(seed, counters)
    word = words.gather(-1, (c % 4).expand(R, D).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(got, word >= dropout.threshold(p))


def test_threshold_edges():
    from vgmr_fast.triton.philox import keep_mask

    # floor(p * 2**32) == 0: every word >= 0, all kept
    assert keep_mask(3, 4, 35, 1e-12, device=DEVICE).all()
    # threshold near 2**32 - 1: (almost) nothing kept, compared as uint32 (not int32)
    p = 1 - 2**-30
    assert torch.equal(keep_mask(3, 4, 35, p, device=DEVICE).cpu(), dropout.keep_mask(3, 4, 35, p))
    p = 0.5 + 2**-33  # words >= 2**31 would be negative as int32
    assert torch.equal(keep_mask(9, 8, 35, p, device=DEVICE).cpu(), dropout.keep_mask(9, 8, 35, p))


def test_same_as_tl_randint4x_on_32_bit_counters():
    # Our generator is Triton's own Philox4x32-10 for uint32 counters (c1 = 0).
    import triton
    import triton.language as tl

    @triton.jit
    def _k(out_ptr, n_ptr, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        n = tl.load(n_ptr + i).to(tl.uint32)
        w0, w1, w2, w3 = tl.randint4x(seed, n)
        w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (4 * N,))
        tl.store(out_ptr + tl.arange(0, 4 * N), w.to(tl.uint32, bitcast=True).to(tl.int64))

    n = torch.tensor([0, 1, 7, 1000003, 2**31 + 5, 2**32 - 1, 12345, 99], device=DEVICE)
    for seed in (0, 20261123, 1099511627779):
        out = torch.empty(4 * len(n), dtype=torch.int64, device=DEVICE)
        _k[(1,)](out, n, seed, N=len(n))
        assert torch.equal(out.view(-1, 4).cpu(), dropout.philox4x32(seed, n.cpu())), seed


def test_seed_tensor_checks():
    from vgmr_fast.triton.philox import seed_tensor

    t = seed_tensor(1099511627779, DEVICE)
    assert t.dtype == torch.int64 and t.numel() == 1 and int(t) == 1099511627779
    for bad in (-1, 2**63, 2**64):
        with pytest.raises(ValueError, match="seed"):
            seed_tensor(bad, DEVICE)


def test_seed_is_read_from_memory():
    # The kernels load the seed from its tensor: changing the tensor's value in place changes
    # the stream (what a CUDA graph replay with a fresh seed relies on).
    from vgmr_fast.triton.philox import philox_words

    seed = torch.tensor([20261123], dtype=torch.int64, device=DEVICE)
    n = torch.tensor([1, 4294967301], device=DEVICE)
    a = philox_words(seed, n).cpu()
    seed.fill_(1099511627779)
    b = philox_words(seed, n).cpu()
    assert torch.equal(a, dropout.philox4x32(20261123, n.cpu()))
    assert torch.equal(b, dropout.philox4x32(1099511627779, n.cpu()))


# ---------------------------------------------------------------------------
# Importing vgmr_fast.triton: never fails hard, never touches CUDA.
# ---------------------------------------------------------------------------
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code, **env):
    e = dict(os.environ, **env)
    e["PYTHONPATH"] = _ROOT + os.pathsep + e.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=e, cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_import_does_not_initialise_cuda():
    out = _run("import torch, vgmr_fast.triton as VT; print(torch.cuda.is_initialized(), VT.NEEDS_FAKE)")
    assert out.split()[0] == "False"


def test_import_without_triton_is_soft():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, vgmr_fast.triton as VT\n"
        "assert VT.AVAILABLE is False and VT.NEEDS_FAKE is True, (VT.AVAILABLE, VT.NEEDS_FAKE)\n"
        "print(VT.unavailable_reason())\n"
        "try:\n"
        "    torch.ops.vgmr_triton.interaction(torch.randn(2, 2, 3))\n"
        "except RuntimeError as e:\n"
        "    print('raised', e)\n"
    )
    out = _run(code)
    assert "raised" in out and "Triton is unavailable" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_not_available_on_cpu_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", "import vgmr_fast.triton as VT; print(VT.AVAILABLE)"],
                       env=env, cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
