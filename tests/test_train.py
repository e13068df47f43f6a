"""`vgmr-fast train`: method parsing, a tiny full grid, determinism, the CLI wiring, a feature-file run."""
import argparse
import json
import os

import numpy as np
import pytest

from vgmr_fast import train as T
from vgmr_fast.train.loop import train_step


def _args(tmp_path, *extra):
    parser = T.add_train_arguments(argparse.ArgumentParser())
    return parser.parse_args(["--quick", "--no-progress", "--out", str(tmp_path), *extra])


def test_parse_method():
    assert T.parse_method("none") == (None, None)
    assert T.parse_method("vgmr") == ("vgmr", None)
    assert T.parse_method("vgmr+ogm") == ("vgmr", "ogm")
    assert T.parse_method("decision") == (None, "decision")
    for bad in ("vgmr+iibalance", "ogm+decision", "vgmr+mlp", "foo", ""):
        with pytest.raises(ValueError, match="method"):
            T.parse_method(bad)


def test_defaults_are_the_documented_grid():
    args = T.add_train_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.settings == ["clean", "noisy"] and args.backbones == ["concat", "transformer"]
    assert args.methods == ["none", "vgmr", "ogm", "iibalance", "decision"]
    assert args.seeds == [0] and args.threads == 1


def test_tiny_grid_writes_table_json_and_plots(tmp_path):
    args = _args(tmp_path, "--settings", "noisy", "--backbones", "concat,transformer",
                 "--methods", "none,vgmr,ogm,iibalance,decision,vgmr+ogm")
    res = T.train_grid(args)
    assert res["n_runs"] == 12 and len(res["summary"]) == 12
    for row in res["summary"]:
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and 0.0 <= row["macro_f1"]["mean"] <= 1.0
        assert set(row["removal"]) == {"dominant", "weak", "noisy"}
        assert len(row["noise_ratio"]["mean"]) == len(args.noise_ratios)
    md = open(tmp_path / "results.md").read()
    for needle in ("| noisy | concat | vgmr |", "macro-F1", "w/o dominant", "VGMR vs. the bare backbone",
                   "noisy, concat: VGMR", "Decision-layer diagnostics", "IIBalance budgets", "value and gate"):
        assert needle in md, needle
    data = json.load(open(tmp_path / "results.json"))
    assert data["summary"][0]["setting"] == "noisy"
    assert any("value_gate" in r for r in data["runs"])
    pngs = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
    for prefix in ("noise_ratio_noisy_concat", "noise_weight_noisy_transformer", "grad_cosine_noisy_concat",
                   "decision_noisy_concat_none", "refinement_noisy_concat_vgmr", "val_loss_noisy_transformer"):
        assert any(f.startswith(prefix) for f in pngs), prefix
    for f in pngs:
        assert open(tmp_path / f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_seeded_runs_are_deterministic(tmp_path):
    out = []
    for k in range(2):
        args = _args(tmp_path / str(k), "--settings", "clean", "--backbones", "concat", "--methods", "vgmr,ogm",
                     "--epochs", "1")
        args.noise_ratios, args.noise_weights = [0.0], [1.0]
        res = T.train_grid(args)
        out.append([(r["test"]["accuracy"], r["history"]["train_loss"]) for r in res["runs"]])
    assert out[0] == out[1]


def test_cli_train_returns_zero(tmp_path):
    from vgmr_fast import cli

    rc = cli.main(["train", "--quick", "--no-progress", "--out", str(tmp_path), "--settings", "bimodal",
                   "--backbones", "concat", "--methods", "none", "--epochs", "1"])
    assert rc == 0 and (tmp_path / "results.md").exists()


def test_feature_file_data(tmp_path):
    rng = np.random.default_rng(0)
    n = 48
    y = np.arange(n) % 6
    np.savez(tmp_path / "cremad.npz", audio=rng.normal(size=(n, 3, 4)) + y[:, None, None] * 0.5,
             visual=rng.normal(size=(n, 2, 5)), labels=y)
    args = _args(tmp_path / "out", "--data", f"cremad:{tmp_path / 'cremad.npz'}", "--backbones", "concat",
                 "--methods", "none,vgmr", "--epochs", "1")
    res = T.train_grid(args)
    assert {r["setting"] for r in res["summary"]} == {"cremad"}
    assert set(res["summary"][0]["removal"]) == {"audio", "visual"}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="backbones"):
        T.train_grid(_args(tmp_path, "--backbones", "resnet"))
    with pytest.raises(ValueError, match="method"):
        T.train_grid(_args(tmp_path, "--methods", "bogus"))
    with pytest.raises(ValueError, match="data"):
        T.train_grid(_args(tmp_path, "--data", "imagenet:/x"))


# ------------------------------------------------- the fused module, value fraction, step times
def test_vgmr_runs_are_the_fused_module_with_the_shared_dropout_stream(tmp_path):
    import torch

    import vgmr_fast
    from vgmr_fast.data import make_benchmark

    data = make_benchmark("bimodal", n_train=16, n_val=8, n_test=8)
    for backend in ("auto", "reference", "cpu"):
        args = _args(tmp_path, "--backend", backend)
        model, _ = T.build_model("concat", "vgmr", data["train"], data["val"], args, seed=0)
        assert type(model.refiner) is vgmr_fast.VGMR
        assert model.refiner.backend == backend  # the fused module always draws the shared Philox stream
        assert not hasattr(model.refiner, "dropout_rng")
    assert model.refiner.resolved_backend(torch.device("cpu")) == "cpu"
    with pytest.raises(SystemExit):
        _args(tmp_path, "--backend", "gpu")


def test_value_fraction_method_and_flag_reach_the_objective(tmp_path):
    import torch

    from vgmr_fast.data import make_benchmark

    data = make_benchmark("noisy", n_train=16, n_val=8, n_test=8)
    xs, masks, y = data["train"].batch(torch.arange(16))
    M = data["train"].num_modalities
    # samples with value targets at steps 0..3: ceil(rho B) on each step with step % K == 0
    for method, extra, samples in (("vgmr", [], [16, 16, 16, 16]), ("vgmr@0.25", [], [4, 4, 4, 4]),
                                   ("vgmr", ["--value-fraction", "0.5"], [8, 8, 8, 8]),
                                   ("vgmr", ["--value-every", "3"], [16, 16]),
                                   ("vgmr%2", [], [16, 16]), ("vgmr@0.25%2+ogm", [], [4, 4])):
        args = _args(tmp_path, *extra)
        model, _ = T.build_model("transformer", method, data["train"], data["val"], args, seed=0)
        seen = []
        orig = model.backbone_logits
        model.backbone_logits = lambda f, m: seen.append(f[0].shape[0]) or orig(f, m)
        opt = torch.optim.AdamW(model.parameters())
        for step in range(4):
            train_step(model, method, xs, masks, y, opt, None, 0, args, step)
        assert seen == [n * (M + 1) for n in samples], (method, extra)  # ONE removal pass per such step


def test_bad_value_fraction_and_every(tmp_path):
    with pytest.raises(ValueError, match="--value-fraction"):
        T.train_grid(_args(tmp_path, "--value-fraction", "0"))
    with pytest.raises(ValueError, match="--value-every"):
        T.train_grid(_args(tmp_path, "--value-every", "0"))
    for bad in ("vgmr@0", "vgmr@1.5", "vgmr%0", "vgmr@x"):
        with pytest.raises(ValueError, match="vgmr@RHO"):
            T.parse_method(bad)
    assert T.parse_method("vgmr@0.25+ogm") == ("vgmr", "ogm")


def test_results_have_step_times_and_ratio_to_the_bare_backbone(tmp_path):
    args = _args(tmp_path, "--settings", "bimodal", "--backbones", "concat", "--methods", "none,vgmr@0.5",
                 "--epochs", "1")
    args.noise_ratios, args.noise_weights = [0.0], [1.0]
    res = T.train_grid(args)
    for row in res["summary"]:
        assert row["step_seconds"]["mean"] > 0
    md = open(tmp_path / "results.md").read()
    assert "## Training-step time" in md and "| bimodal | concat | none |" in md
    line = next(l for l in md.splitlines() if l.startswith("| bimodal | concat | none |") and l.endswith("| 1.00 |"))
    assert line
    assert res["environment"]["world_size"] == 1


@pytest.mark.parametrize("delta, expected", [
    ({"mean": float("nan"), "std": float("nan"), "n": 0}, "–"),
    ({"mean": 0.0, "std": 0.0, "n": 1}, "ties"),
    ({"mean": 0.0, "std": 0.1, "n": 3}, "ties"),
    ({"mean": 0.02, "std": 0.0, "n": 1}, "is ahead on one seed (not conclusive) of"),
    ({"mean": -0.02, "std": 0.0, "n": 1}, "is behind on one seed (not conclusive) of"),
    # two standard errors of n = 4, std 0.1: 0.1 exactly; the rule is strict
    ({"mean": 0.1, "std": 0.1, "n": 4}, "is within seed noise of"),
    ({"mean": 0.1001, "std": 0.1, "n": 4}, "beats"),
    ({"mean": -0.1, "std": 0.1, "n": 4}, "is within seed noise of"),
    ({"mean": -0.1001, "std": 0.1, "n": 4}, "is worse than"),
    ({"mean": 0.01, "std": 0.0, "n": 2}, "beats"),
])
def test_verdict_boundaries(delta, expected):
    from vgmr_fast.train.stats import verdict

    assert verdict(delta) == expected


def test_one_verdict_in_both_tables(tmp_path):
    """The VGMR comparison and the probe table phrase one seed's result with the same rule."""
    from vgmr_fast.train.stats import verdict

    args = _args(tmp_path, "--settings", "bimodal", "--backbones", "concat", "--methods", "none,vgmr",
                 "--epochs", "1", "--probes")
    args.noise_ratios, args.noise_weights = [0.0], [1.0]
    res = T.train_grid(args)
    row = next(r for r in res["probes"] if r["method"] == "vgmr")
    phrase = verdict(row["delta_accuracy"])
    md = open(tmp_path / "results.md").read()
    assert f"bimodal, concat: VGMR {phrase} the bare backbone" in md
    assert f"| {phrase} bare (" in md


def test_unimodal_models_are_trained_once_for_probes_and_decision_diagnostics(tmp_path, monkeypatch):
    """With --probes the seed-0 unimodal Concat of each modality serves both the probe reference and
    the decision-layer diagnostics: one training per modality, not two."""
    from vgmr_fast.train import probes

    calls = []
    real = probes.train_one

    def counting(model, method, data, args, seed, progress=None):
        calls.append(data["train"].num_modalities)
        return real(model, method, data, args, seed, progress)

    monkeypatch.setattr(probes, "train_one", counting)
    args = _args(tmp_path, "--settings", "bimodal", "--backbones", "concat", "--methods", "none",
                 "--epochs", "1", "--probes")
    args.noise_ratios, args.noise_weights = [0.0], [1.0]
    res = T.train_grid(args)
    modalities = len(res["runs"][0]["probe"]["names"])
    assert calls == [1] * modalities
    assert [r["modality"] for r in res["analyses"]["decision"]["bimodal"]["unimodal"]] == \
        res["runs"][0]["probe"]["names"]
