"""The bench's counters: ATen ops per step, kernels in torch.compile's generated code, bytes saved
for backward (counts, never times)."""
import pytest
import torch

from vgmr_fast import reference as ref
from vgmr_fast.bench import backends
from vgmr_fast.bench.opcount import (OpCounter, capture_inductor_code, count_generated_kernels,
                                     saved_tensor_bytes)

WIDTHS, D = [16, 8, 4], 8
CPU_REASON = backends.probe_backend("cpu")
needs_cpu_backend = pytest.mark.skipif(CPU_REASON is not None, reason=f"C++ CPU backend unavailable: {CPU_REASON}")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 6, w, generator=g) for w in WIDTHS]
    masks = [torch.tensor([[True] * 6, [True] * 3 + [False] * 3]) for _ in WIDTHS]
    return xs, masks


def _reference():
    torch.manual_seed(0)
    m = ref.VGMR(WIDTHS, D, dropout=0.1)
    m.dropout_rng = "torch"
    return m


def _train_ops(module, xs, masks):
    module.train()
    for p in module.parameters():
        p.grad = None  # as the bench's step does (zero_grad): no accumulation ops
    with OpCounter() as counter:
        outs = module(xs, masks)
        torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
    return counter.total


def _infer_ops(module, xs, masks):
    module.eval()
    with torch.inference_mode(), OpCounter() as counter:
        module(xs, masks)
    return counter.total


def test_op_counts_are_deterministic_and_leave_out_views():
    xs, masks = _inputs()
    m = _reference()
    first, second = _infer_ops(m, xs, masks), _infer_ops(m, xs, masks)
    assert first == second > 0
    assert _train_ops(m, xs, masks) == _train_ops(m, xs, masks) > first
    with OpCounter() as counter:
        t = torch.randn(4, 6)
        t.view(6, 4).t().unsqueeze(0).expand(2, 4, 6)
    assert counter.total == 1 and "aten::randn" in counter.by_name


@needs_cpu_backend
def test_fused_module_dispatches_fewer_ops_than_the_reference():
    from vgmr_fast import VGMR

    xs, masks = _inputs()
    r = _reference()
    f = VGMR(WIDTHS, D, dropout=0.1, backend="cpu")
    f.load_state_dict(r.state_dict())
    assert _infer_ops(f, xs, masks) < _infer_ops(r, xs, masks)
    assert _train_ops(f, xs, masks) < _train_ops(r, xs, masks)


def test_saved_bytes_leave_out_inputs_and_parameters():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)

    def f():
        return torch.tanh(x @ w)  # saves x (an input) and tanh's output (4x8 floats)

    _, everything = saved_tensor_bytes(f)
    _, activations = saved_tensor_bytes(f, exclude=[x, w])
    assert activations == 4 * 8 * 4
    assert everything == activations + x.numel() * 4


SAMPLE_CODE = '''
cpp_fused_add_0 = async_compile.cpp_pybinding(['float*'], """ extern "C" void kernel(float* a) { a[0] = 1; } """)
class Runner:
    def call(self, args):
        primals_1, primals_2 = args
        args.clear()
        assert_size_stride(primals_1, (4, 8), (8, 1), 'input')
        buf0 = empty_strided_cpu((4, 8), (8, 1), torch.float32)
        extern_kernels.mm(primals_1, reinterpret_tensor(primals_2, (8, 8), (1, 8), 0), out=buf0)
        cpp_fused_add_0(buf0)
        buf1 = torch.ops.vgmr.gate_norm.default(buf0, primals_1)
        triton_poi_fused_1.run(buf0, buf1, 32, stream=stream0)
        del primals_1
        return (buf0, buf1, )
def benchmark_compiled_module(times=10, repeat=10):
    extern_kernels.mm(a, b, out=c)
'''


def test_generated_kernels_counted_in_call_only():
    k = count_generated_kernels([SAMPLE_CODE, SAMPLE_CODE])
    assert k["graphs"] == 2
    assert k["by_kind"] == {"library call": 2, "inductor kernel": 4, "fallback op": 2}
    assert k["total"] == 8
    assert count_generated_kernels(["no call function here"])["graphs"] == 0


def test_generated_kernels_of_a_real_inductor_compile():
    w = torch.randn(8, 8, requires_grad=True)

    def f(x):
        return torch.nn.functional.gelu(x @ w).sum(-1)

    compiled = torch.compile(f, dynamic=False)
    with capture_inductor_code() as codes:
        compiled(torch.randn(4, 8)).sum().backward()
    k = count_generated_kernels(codes)
    assert k["graphs"] == 2  # forward and backward
    assert k["by_kind"].get("library call", 0) >= 2  # x @ w forward, and the weight gradient
    assert k["by_kind"].get("inductor kernel", 0) >= 1


def test_count_step_is_the_op_counter_of_one_call():
    from vgmr_fast.bench.common import count_step
    from vgmr_fast.bench.opcount import count_aten_ops

    x = torch.randn(4, 8)

    def step():
        torch.nn.functional.gelu(x @ x.t()).sum()

    counted = count_step(step, "cpu")
    _, counter = count_aten_ops(step)
    assert counted["aten_ops"] == counter.total == 3
    assert counted["aten_ops_by_name"] == dict(counter.by_name)
