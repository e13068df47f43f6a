"""The ``imbalanced`` preset is one: the gap is measured with linear probes, not assumed.

Small case: the preset's data at reduced size, the Concat backbone (seconds on
a CPU), the training command's own build/train functions and default
optimisation settings.
"""
import argparse
import json

import pytest
import torch

from vgmr_fast import train as T
from vgmr_fast.train.probes import single_modality
from vgmr_fast.analysis.probe import probe_accuracy, probe_model
from vgmr_fast.data import make_benchmark

SIZES = dict(n_train=1200, n_val=300, n_test=600)


def _args(*extra):
    return T.add_train_arguments(argparse.ArgumentParser()).parse_args(
        ["--no-progress", "--cosine-points", "0", *extra])


def _gaps(setting, method="none", seed=0, **overrides):
    """(joint probe accuracies, unimodal probe accuracies) of a Concat on ``setting``."""
    torch.set_num_threads(1)
    args = _args()
    data = make_benchmark(setting, seed=0, **{**SIZES, **overrides})
    model, _ = T.build_model("concat", method, data["train"], data["val"], args, seed)
    T.train_one(model, method, data, args, seed)
    joint = probe_model(model, data["train"], data["test"])
    uni = []
    for m in range(data["train"].num_modalities):
        sub = {k: single_modality(v, m) for k, v in data.items()}
        umodel, _ = T.build_model("concat", "none", sub["train"], sub["val"], args, seed)
        T.train_one(umodel, "none", sub, args, seed)
        uni.append(probe_accuracy(umodel, sub["train"], sub["test"], 0))
    return joint, uni


def test_bare_joint_model_under_trains_the_weak_modality():
    joint, uni = _gaps("imbalanced")
    gap_dominant, gap_weak = uni[0] - joint[0], uni[1] - joint[1]
    assert gap_weak >= 0.10, (joint, uni)
    assert abs(gap_dominant) < 0.05, (joint, uni)  # the dominant encoder learns as well as alone
    assert uni[1] > 0.6  # the weak modality is learnable alone (4 classes: chance 0.25)


def test_without_the_nuisance_the_same_data_is_not_imbalanced():
    """Contrast: the gap comes from the preset's weak-modality structure, not from the probe."""
    joint, uni = _gaps("imbalanced", weak_nuisance=0.0)
    assert abs(uni[1] - joint[1]) < 0.05, (joint, uni)


def test_a_method_that_trains_each_encoder_on_its_own_closes_the_gap():
    """The decision-layer allocation head has a unimodal loss per modality: the probe must see the weak
    encoder learn (so a gap that does not shrink for another method is that method's, not the probe's)."""
    joint, uni = _gaps("imbalanced", method="decision")
    assert uni[1] - joint[1] < 0.05, (joint, uni)


def test_train_command_reports_probes_for_the_imbalanced_setting(tmp_path):
    out = tmp_path / "o"
    T.train_grid(_args("--quick", "--out", str(out), "--settings", "imbalanced", "--backbones", "concat",
                       "--methods", "none,iibalance", "--seeds", "0,1"))
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["probes"]}
    assert set(rows) == {"none", "iibalance"}
    for r in res["runs"]:
        p = r["probe"]
        assert p["names"] == ["dominant", "weak"]
        assert p["gap"] == pytest.approx([u - j for u, j in zip(p["unimodal"], p["joint"])])
        assert len(p["block_norms"]["norms"]) == 2
    assert rows["iibalance"]["paired"] == 2 and rows["none"]["gap"][1]["n"] == 2
    md = (out / "results.md").read_text()
    assert "## Linear probes on the frozen modality encoders" in md and "alignment active" in md
    # other settings do not pay for probes unless asked
    out2 = tmp_path / "p"
    T.train_grid(_args("--quick", "--out", str(out2), "--settings", "bimodal", "--backbones", "concat",
                       "--methods", "none", "--seeds", "0"))
    assert "probe" not in json.loads((out2 / "results.json").read_text())["runs"][0]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizer_flag(optimizer):
    model = torch.nn.Linear(2, 2)
    opt = T.make_optimizer(model, _args("--optimizer", optimizer))
    assert isinstance(opt, torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)
    args = _args()
    args.optimizer = "rmsprop"
    with pytest.raises(ValueError, match="--optimizer"):
        T.make_optimizer(model, args)


def test_ablation_rows():
    from vgmr_fast.train.ablate import ablate, main

    rows = ablate("concat", [0, 1], ["none|--epochs 1", "iibalance|--epochs 1 --lambda-align 0"],
                  n_train=64, n_val=32, n_test=32)
    assert rows[0].startswith("| concat | none | `--epochs 1` |") and rows[0].endswith("| – |")
    cells = rows[1].split("|")
    assert cells[2].strip() == "iibalance" and len(cells[6].split(",")) == 2  # one trigger rate per seed
    assert main([]) == 2  # usage
