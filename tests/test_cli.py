"""The `vgmr-fast` command: `check` passes on a faithful backend and fails on a broken one;
`bench` runs end to end on tiny sizes and writes its JSON, markdown and PNG; `train` degrades
clearly when its module is missing."""
import json
import subprocess
import sys

import pytest
import torch

from vgmr_fast import check as check_mod
from vgmr_fast import cli
from vgmr_fast import reference as ref
from vgmr_fast.bench import backends

OPS_ONLY = ["--ops", "summary_pool,interaction,gate_norm"]


def _fake_ops(noise: float = 0.0, which: str = "gate_norm"):
    """Reference-backed stand-ins for vgmr_fast.ops (optionally with noise added to one op)."""

    def maybe_noisy(name, t):
        if noise and name == which:
            return t + noise * torch.randn_like(t)
        return t

    def summary_pool(h, mask=None, *, backend):
        mean, mx = ref.summary_pool(h, mask)
        return maybe_noisy("summary_pool", mean), mx

    def interaction(s, *, backend):
        return maybe_noisy("interaction", ref.interaction(s))

    def gate_norm(zpre, bias_row, x, w, b, *, alpha=0.5, beta=0.2, p=0.0, seed=0, backend):
        return maybe_noisy("gate_norm", ref.gate_norm(zpre, bias_row, x, w, b, alpha, beta, p, seed))

    fns = {"summary_pool": summary_pool, "interaction": interaction, "gate_norm": gate_norm}
    return lambda name: fns[name]


@pytest.fixture
def fake_cpu_backend(monkeypatch):
    monkeypatch.setattr(check_mod, "probe_backends", lambda device=None, only=None: {"cpu": None})

    def install(noise=0.0, which="gate_norm"):
        monkeypatch.setattr(check_mod, "fused_op", _fake_ops(noise, which))

    return install


def test_check_passes_on_a_faithful_backend(fake_cpu_backend, capsys):
    fake_cpu_backend()
    assert cli.main(["check", "--quick", *OPS_ONLY]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    for op in ("summary_pool", "interaction", "gate_norm"):
        assert op in out


@pytest.mark.parametrize("which", ["summary_pool", "interaction", "gate_norm"])
def test_check_fails_on_a_noisy_backend(fake_cpu_backend, capsys, which):
    fake_cpu_backend(noise=1e-3, which=which)
    assert cli.main(["check", "--quick", "--dtypes", "float32", *OPS_ONLY]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    failing = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert failing and all(which in line for line in failing)


def test_check_fails_when_nothing_runs(monkeypatch, capsys):
    monkeypatch.setattr(check_mod, "probe_backends",
                        lambda device=None, only=None: {"cpu": "not built (test)"})
    assert cli.main(["check"]) == 1
    assert "nothing was checked" in capsys.readouterr().out


CPU_REASON = backends.probe_backend("cpu")
needs_cpu_backend = pytest.mark.skipif(CPU_REASON is not None, reason=f"C++ CPU backend unavailable: {CPU_REASON}")


@needs_cpu_backend
def test_check_real_cpu_ops_pass(capsys):
    rc = cli.main(["check", "--quick", "--backends", "cpu", *OPS_ONLY])
    assert rc == 0, capsys.readouterr().out


@needs_cpu_backend
def test_check_real_cpu_module_passes(capsys):
    rc = cli.main(["check", "--quick", "--backends", "cpu", "--ops", "module"])
    assert rc == 0, capsys.readouterr().out


@needs_cpu_backend
def test_check_catches_a_broken_real_op(monkeypatch, capsys):
    import vgmr_fast.ops as ops

    real = ops.gate_norm

    def broken(*args, **kwargs):
        y = real(*args, **kwargs)
        return y + 1e-3 * torch.randn_like(y)

    monkeypatch.setattr(ops, "gate_norm", broken)
    assert cli.main(["check", "--quick", "--backends", "cpu", "--dtypes", "float32", "--ops", "gate_norm"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_tiny_writes_json_md_png(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["bench", "--quick", "--tiny", "--threads", "1", "--no-progress",
                       "--out", str(tmp_path), "--name", "tiny"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    for title in ("ops, mosei", "VGMR layer, large", "VGMR layer summary, mosei", "Table 7",
                  "Concat backbone", "sweep over T", "skipped"):
        assert title in out
    for row in ("ATen ops, inference forward", "ATen ops, training forward+backward",
                "training step vs torch.compile(reference)", "inference vs torch.compile(reference)",
                "activations saved for backward", "training-step peak memory vs eager",
                "torch.compile(fullgraph=True) training with dropout", "floor, training step",
                "launch floor, inference forward"):
        assert row in out
    doc = json.loads((tmp_path / "tiny.json").read_text())
    meta = doc["meta"]
    for key in ("device_name", "cpu_model", "torch_threads", "torch", "triton", "date", "commit"):
        assert key in meta
    assert meta["torch_threads"] == 1
    assert doc["run"]["copy_bandwidth"]["bytes_per_s"] > 0
    assert doc["run"]["op_cost"]["seconds"] > 0
    levels = {r["level"] for r in doc["records"]}
    assert levels == {"ops", "layer", "e2e", "sweep", "fullgraph", "memory-timeline"}
    timed = [r for r in doc["records"]
             if r["level"] not in ("fullgraph", "memory-timeline") and r["mode"] != "unavailable"]
    for r in timed:
        assert r["median_s"] > 0 and r["q25_s"] <= r["median_s"] <= r["q75_s"] and r["samples_s"]
    layer = {(r["setting"], r["mode"], r["peer"]): r for r in doc["records"] if r["level"] == "layer"}
    for key, r in layer.items():  # counts, not times
        assert isinstance(r["aten_ops"], int) and r["aten_ops"] > 0, key
        assert r["floor_bytes"] > 0 and r["x_floor"] > 0 and r["x_launch_floor"] > 0
    for mode in ("train", "train-xgrad", "infer"):
        assert layer[("mosei", mode, "gemm-only")]["aten_ops"] < layer[("mosei", mode, "eager")]["aten_ops"]
    # the user's settings: features with and without gradients, the inference batch sweep
    assert layer[("mosei", "train-xgrad", "eager")]["aten_ops"] > layer[("mosei", "train", "eager")]["aten_ops"]
    assert {("mosei-B1", "infer"), ("mosei-B128", "infer")} <= {(k[0], k[1]) for k in layer}
    timelines = {(r["mode"], r["peer"]) for r in doc["records"] if r["level"] == "memory-timeline"}
    assert {("train", "eager"), ("train-xgrad", "eager")} <= timelines
    assert (tmp_path / "tiny-memory.png").stat().st_size > 0
    eager_train = layer[("mosei", "train", "eager")]
    assert eager_train["saved_bytes"] > 0 and eager_train["saved_vs_eager"] == pytest.approx(1.0)
    assert layer[("mosei", "train", "eager")]["aten_ops"] > layer[("mosei", "infer", "eager")]["aten_ops"]
    full = {r["peer"]: r for r in doc["records"] if r["level"] == "fullgraph"}
    assert full["eager"]["ok"] and full["eager"]["graphs"] == 1 and full["eager"]["recompiles"] == 0
    assert set(full) == {"eager"} | {f"fused-{b}" for b in doc["run"]["backends"]}
    for r in full.values():
        assert r["ok"] or r["error"]  # a failure says why
    eager = [r for r in timed if r.get("peer") == "eager"]
    assert eager and all(r["vs_eager"] == pytest.approx(1.0) for r in eager)
    assert any(r.get("x_gemm_only") for r in doc["records"] if r["level"] == "layer")
    assert any("peak_bytes" in r for r in doc["records"] if r["level"] == "layer")
    rows = {r["row"] for r in doc["records"] if r["level"] == "e2e" and r["backbone"] == "transformer"}
    assert {"bare", "mlp", "gate", "cross_attention", "vgmr-eager"} <= rows
    assert {f"vgmr-fused-{b}-vf0.25" for b in doc["run"]["backends"]} <= rows
    e2e_counts = [r for r in doc["records"] if r["level"] == "e2e" and r["mode"] != "unavailable"]
    assert e2e_counts and all(r["aten_ops"] > 0 for r in e2e_counts)
    assert any("torch.compile" in s["what"] for s in doc["skipped"])  # --quick says what it left out
    png = tmp_path / "tiny.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert "```" in (tmp_path / "tiny.md").read_text()


def test_bench_rejects_unknown_level(capsys):
    assert cli.main(["bench", "--levels", "ops,nope"]) == 2


def test_train_without_its_module(monkeypatch, capsys):
    def missing():
        raise ImportError("No module named 'vgmr_fast.train' (test)")

    monkeypatch.setattr(cli, "_train_module", missing)
    assert cli.main(["train"]) == 2
    assert "not available" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "check" in capsys.readouterr().out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "vgmr_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert "bench" in r.stdout and "check" in r.stdout and "train" in r.stdout
