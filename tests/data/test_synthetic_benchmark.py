"""The controlled benchmark: shapes, determinism, and that its knobs do what they say."""
import pytest
import torch

from vgmr_fast.data import PRESETS, BenchmarkConfig, MultimodalDataset, make_benchmark, stratified_split

SMALL = dict(n_train=64, n_val=16, n_test=32)


def _pooled_probe_acc(tr, te, mods):
    """Nearest-class-mean accuracy on mean-pooled features of the chosen modalities (closed form)."""
    f_tr = torch.cat([tr.xs[m].mean(1) for m in mods], 1)
    f_te = torch.cat([te.xs[m].mean(1) for m in mods], 1)
    means = torch.stack([f_tr[tr.y == c].mean(0) for c in range(tr.num_classes)])
    return float((torch.cdist(f_te, means).argmin(1) == te.y).float().mean())


def test_shapes_names_and_splits():
    cfg = BenchmarkConfig(lengths=(5, 4, 3), widths=(7, 6, 2), num_classes=3, **SMALL)
    d = make_benchmark(cfg, seed=1)
    assert set(d) == {"train", "val", "test"}
    assert [len(d[s]) for s in ("train", "val", "test")] == [64, 16, 32]
    tr = d["train"]
    assert tr.names == ["dominant", "weak", "noisy"]
    assert [tuple(x.shape[1:]) for x in tr.xs] == [(5, 7), (4, 6), (3, 2)]
    assert all(x.dtype == torch.float32 for x in tr.xs)
    assert tr.masks is None and tr.num_classes == 3
    assert tr.widths == {"dominant": 7, "weak": 6, "noisy": 2}
    assert int(tr.y.min()) >= 0 and int(tr.y.max()) < 3


def test_seeded_determinism_and_seed_sensitivity():
    a = make_benchmark("noisy", seed=3, **SMALL)
    b = make_benchmark("noisy", seed=3, **SMALL)
    c = make_benchmark("noisy", seed=4, **SMALL)
    for s in ("train", "test"):
        assert all(torch.equal(x, y) for x, y in zip(a[s].xs, b[s].xs))
        assert torch.equal(a[s].y, b[s].y)
    assert not torch.equal(a["train"].xs[0], c["train"].xs[0])


def test_bimodal_preset_and_overrides():
    d = make_benchmark("bimodal", seed=0, **SMALL)
    assert d["train"].num_modalities == 2
    d = make_benchmark(BenchmarkConfig(**SMALL), seed=0, num_classes=5)
    assert d["train"].num_classes == 5


def test_noise_ratio_replaces_exact_fraction_with_heavy_noise():
    cfg = BenchmarkConfig(n_train=200, n_val=0, n_test=0, lengths=(10, 10, 10), noise_ratio=0.3, noise_weight=50.0,
                          noise_modalities=("dominant",), noise_sample_frac=1.0)
    tr = make_benchmark(cfg, seed=0)["train"]
    # replaced steps have |x| of order 50; clean ones of order 1
    heavy = (tr.xs[0].abs().amax(-1) > 20).sum(1)
    assert torch.all(heavy == 3)
    assert (tr.xs[1].abs().amax(-1) > 20).sum() == 0  # other modalities untouched
    assert tr.meta["corrupted"][:, 0].all() and not tr.meta["corrupted"][:, 1:].any()


def test_noise_sample_fraction():
    cfg = BenchmarkConfig(n_train=400, n_val=0, n_test=0, noise_ratio=0.5, noise_weight=50.0,
                          noise_modalities=("noisy",), noise_sample_frac=0.25)
    tr = make_benchmark(cfg, seed=0)["train"]
    frac = float(tr.meta["corrupted"][:, 2].float().mean())
    assert 0.15 < frac < 0.35


def test_dominance_and_complementarity_knobs():
    """Dominant modality alone is strong only on informative samples; the weak one adds information."""
    cfg = BenchmarkConfig(n_train=800, n_val=0, n_test=800, include_noisy=False, weak_snr=0.25, dominance=4.0,
                          complementarity=0.5)
    d = make_benchmark(cfg, seed=0)
    tr, te = d["train"], d["test"]
    inf = te.meta["dominant_informative"]
    acc_dom = _pooled_probe_acc(tr, te, [0])
    acc_both = _pooled_probe_acc(tr, te, [0, 1])
    assert acc_both > acc_dom + 0.05
    # on non-informative samples the dominant modality is at chance
    te_non = te.subset(~inf)
    assert _pooled_probe_acc(tr, te_non, [0]) < 0.45
    # with complementarity 0 it is (nearly) perfect
    d0 = make_benchmark(cfg, seed=0, complementarity=0.0)
    assert _pooled_probe_acc(d0["train"], d0["test"], [0]) > 0.95


def test_conflict_shows_another_class():
    cfg = BenchmarkConfig(n_train=600, n_val=0, n_test=600, conflict=1.0, noisy_snr=1.0, num_classes=3)
    conflicted = make_benchmark(cfg, seed=0)
    clean = make_benchmark(cfg, seed=0, conflict=0.0)  # same seed: same class directions
    assert conflicted["test"].meta["conflict"].all() and not clean["test"].meta["conflict"].any()
    # a probe fit on consistent data reads the noisy modality well, and is systematically wrong on conflicts
    assert _pooled_probe_acc(clean["train"], clean["test"], [2]) > 0.9
    assert _pooled_probe_acc(clean["train"], conflicted["test"], [2]) < 0.1
    # the other modalities are unaffected by the conflict knob
    assert _pooled_probe_acc(clean["train"], conflicted["test"], [1]) > 0.5


def test_variable_lengths_give_masks_and_zero_padding():
    cfg = BenchmarkConfig(min_length_frac=0.5, lengths=(8, 6, 4), **SMALL)
    tr = make_benchmark(cfg, seed=0)["train"]
    assert tr.masks is not None
    for x, mk in zip(tr.xs, tr.masks):
        assert mk.shape == x.shape[:2]
        assert torch.all(x[~mk] == 0)
        lengths = mk.sum(1)
        assert lengths.min() >= x.shape[1] // 2 and lengths.max() <= x.shape[1]
        # valid steps are a prefix
        assert torch.equal(mk, torch.arange(x.shape[1])[None] < lengths[:, None])
    xs, masks, y = tr.batch(torch.arange(4))
    assert all(m.dtype == torch.bool for m in masks)


@pytest.mark.parametrize("bad", [dict(num_classes=1), dict(complementarity=1.5), dict(noise_ratio=-0.1),
                                 dict(event_frac=0.0), dict(lengths=(3, 0, 2)), dict(noise_modalities=("nope",)),
                                 dict(min_length_frac=0.0), dict(n_train=-1), dict(weak_snr=-1.0),
                                 dict(weak_nuisance=-1.0), dict(weak_nuisance_rank=24),
                                 dict(weak_nuisance_rank=-1)])
def test_config_validation_names_the_argument(bad):
    key = next(iter(bad))
    with pytest.raises((ValueError, TypeError), match=key.split("_")[0]):
        BenchmarkConfig(**bad)


def test_make_benchmark_rejects_bad_config_and_seed():
    with pytest.raises(ValueError, match="config"):
        make_benchmark("nope")
    with pytest.raises(TypeError, match="config"):
        make_benchmark(3)
    with pytest.raises(TypeError, match="seed"):
        make_benchmark("clean", seed=1.5)
    assert set(PRESETS) >= {"clean", "noisy", "bimodal", "imbalanced"}


def test_dataset_batches_subset_and_stats():
    ds = make_benchmark("clean", seed=0, **SMALL)["train"]
    seen = torch.cat([b[2] for b in ds.batches(10, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert seen.numel() == len(ds) and torch.equal(seen.sort()[0], ds.y.sort()[0])
    sub = ds.subset(torch.arange(5))
    assert len(sub) == 5 and sub.meta["dominant_informative"].shape == (5,)
    means, stds = ds.feature_stats()
    assert means[0].shape == (ds.xs[0].shape[-1],)
    torch.testing.assert_close(means[0], ds.xs[0].reshape(-1, ds.xs[0].shape[-1]).mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(0))


def test_dataset_validation():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="samples"):
        MultimodalDataset([x, torch.randn(5, 3, 2)], torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="y"):
        MultimodalDataset([x], torch.zeros(4))
    with pytest.raises(ValueError, match="masks"):
        MultimodalDataset([x], torch.zeros(4, dtype=torch.long), masks=[torch.ones(4, 2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="names"):
        MultimodalDataset([x, x], torch.zeros(4, dtype=torch.long), names=["a", "a"])


def test_stratified_split_keeps_classes():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    parts = stratified_split(y, [0.6, 0.2, 0.2], seed=0)
    assert sum(p.numel() for p in parts) == 100
    assert torch.equal(torch.cat(parts).sort()[0], torch.arange(100))
    assert torch.bincount(y[parts[0]]).tolist() == [30, 18, 12]
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(y, [0.5, 0.2])


def test_weak_nuisance_off_draws_nothing_extra():
    """The nuisance knob off (its default) leaves every other preset's tensors exactly as they were."""
    a = make_benchmark("clean", seed=5, **SMALL)
    b = make_benchmark("clean", seed=5, weak_nuisance=0.0, weak_nuisance_rank=8, **SMALL)
    for s in ("train", "test"):
        assert all(torch.equal(x, y) for x, y in zip(a[s].xs, b[s].xs))


def test_weak_nuisance_is_a_time_constant_subspace_orthogonal_to_the_class_directions():
    cfg = BenchmarkConfig(n_train=3000, n_val=0, n_test=0, include_noisy=False, widths=(8, 20),
                          weak_nuisance=3.0, weak_nuisance_rank=6, weak_snr=2.0)
    tr = make_benchmark(cfg, seed=0)["train"]
    pooled = tr.xs[1].mean(1).double()
    # remove the class means: what is left is background (var 1/T per dim) + nuisance (var 9 in 6 dims)
    means = torch.stack([pooled[tr.y == c].mean(0) for c in range(tr.num_classes)])
    resid = pooled - means[tr.y]
    evals, evecs = torch.linalg.eigh(resid.t().cov())
    assert torch.all(evals[-6:] > 9 * 0.8) and torch.all(evals[:-6] < 0.2)
    q = evecs[:, -6:]  # the nuisance subspace
    diffs = means - means.mean(0)
    assert float((diffs @ q).norm() / diffs.norm()) < 0.1
    # it is constant over time: the step-to-step differences carry none of it
    steps = (tr.xs[1][:, 1] - tr.xs[1][:, 0]).double()
    assert float((steps @ q).var(0).max()) < 3.0  # background only: var 2 (+ class events)


def test_imbalanced_preset_shape():
    d = make_benchmark("imbalanced", seed=0, n_train=8, n_val=4, n_test=4)
    cfg = d["train"].meta["config"]
    assert d["train"].names == ["dominant", "weak"]
    assert cfg["weak_nuisance"] > 0 and cfg["weak_nuisance_rank"] < cfg["widths"][1]
