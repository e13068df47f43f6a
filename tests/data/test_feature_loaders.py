"""Feature-file loaders, on small files the tests write in each documented format."""
import pickle

import numpy as np
import pytest
import torch

from vgmr_fast.data import CREMAD_CLASSES, load_cremad, load_mosei, load_mosi, sentiment_to_class


def _mosi_split(rng, n, t=6, label_shape="mult", pad=2):
    text = rng.normal(size=(n, t, 5)).astype(np.float32)
    audio = rng.normal(size=(n, t, 3)).astype(np.float32)
    vision = rng.normal(size=(n, t, 4)).astype(np.float32)
    # left zero padding (as the aligned CMU pickles): the first `pad` steps of sample 0 are empty
    for x in (text, audio, vision):
        x[0, :pad] = 0.0
    score = np.linspace(-3, 3, n)
    labels = score.reshape(n, 1, 1) if label_shape == "mult" else score
    key = "labels" if label_shape == "mult" else "regression_labels"
    return {"text": text, "audio": audio, "vision": vision, key: labels, "id": np.arange(n)}


def test_mosi_aligned_pickle(tmp_path):
    rng = np.random.default_rng(0)
    data = {"train": _mosi_split(rng, 9), "valid": _mosi_split(rng, 5), "test": _mosi_split(rng, 7)}
    data["train"]["audio"][1, 3, 0] = -np.inf  # MOSEI-style non-finite COVAREP entry
    path = tmp_path / "aligned_50.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    d = load_mosi(str(path))
    assert set(d) == {"train", "val", "test"}
    tr = d["train"]
    assert tr.names == ["text", "audio", "vision"] and len(tr) == 9 and tr.num_classes == 2
    assert [tuple(x.shape[1:]) for x in tr.xs] == [(6, 5), (6, 3), (6, 4)]
    torch.testing.assert_close(tr.xs[0], torch.from_numpy(data["train"]["text"]))
    # binary: score > 0 is positive (docs/math.md §6)
    assert torch.equal(tr.y, torch.from_numpy((np.linspace(-3, 3, 9) > 0).astype(np.int64)))
    torch.testing.assert_close(tr.meta["score"], torch.from_numpy(np.linspace(-3, 3, 9)))
    assert torch.isfinite(tr.xs[1]).all() and tr.xs[1][1, 3, 0] == 0 and tr.meta["nonfinite"] == 1
    # masks from the zero padding, shared across modalities
    assert tr.masks is not None
    assert tr.masks[0][0].tolist() == [False, False, True, True, True, True]
    assert all(torch.equal(tr.masks[0], mk) for mk in tr.masks)
    assert tr.masks[0][1:].all()


def test_mosei_mmsa_style_lengths_seven_class_and_missing_val(tmp_path):
    rng = np.random.default_rng(1)
    tr = _mosi_split(rng, 12, label_shape="mmsa")
    tr["audio_lengths"] = np.array([2] * 12)
    data = {"train": tr, "test": _mosi_split(rng, 4, label_shape="mmsa")}
    path = tmp_path / "mosei.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    d = load_mosei(str(path), task="7class", val_frac=0.25, seed=0)
    assert len(d["train"]) + len(d["val"]) == 12 and len(d["val"]) > 0
    assert d["train"].num_classes == 7
    assert int(d["test"].y.min()) == 0 and int(d["test"].y.max()) == 6
    assert d["train"].masks[1].sum(1).eq(2).all()  # audio_lengths respected


def test_mosi_drop_neutral_and_mask_none(tmp_path):
    rng = np.random.default_rng(2)
    sp = _mosi_split(rng, 5)  # scores -3, -1.5, 0, 1.5, 3
    path = tmp_path / "m.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train": sp, "valid": sp, "test": sp}, f)
    d = load_mosi(str(path), drop_neutral=True, mask="none")
    assert len(d["test"]) == 4 and d["test"].masks is None
    assert d["test"].y.tolist() == [0, 0, 1, 1]


def test_mosi_errors(tmp_path):
    path = tmp_path / "bad.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train": {"text": np.zeros((2, 3, 4))}}, f)
    with pytest.raises(ValueError, match="labels"):
        load_mosi(str(path))
    with open(path, "wb") as f:
        pickle.dump({"foo": 1}, f)
    with pytest.raises(ValueError, match="splits"):
        load_mosi(str(path))
    with pytest.raises(ValueError, match="task"):
        load_mosi(str(path), task="regression")
    with pytest.raises(ValueError, match="extension"):
        load_mosi(str(tmp_path / "x.csv"))


def test_sentiment_to_class():
    assert sentiment_to_class([-3.0, -0.2, 0.0, 0.4, 2.6]).tolist() == [0, 0, 0, 1, 1]
    assert sentiment_to_class([-3.4, -0.6, 0.0, 0.4, 2.6], "7class").tolist() == [0, 2, 3, 3, 6]


def test_cremad_npz_with_names_and_no_split(tmp_path):
    rng = np.random.default_rng(3)
    n = 60
    emos = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    names = np.array([f"10{i:02d}_DFA_{emos[i % 6]}_XX" for i in range(n)])
    path = tmp_path / "cremad.npz"
    np.savez(path, audio=rng.normal(size=(n, 8)).astype(np.float32),
             visual=rng.normal(size=(n, 3, 5)).astype(np.float32), names=names)
    d = load_cremad(str(path), fractions=(0.5, 0.25, 0.25), seed=0)
    assert [len(d[s]) for s in ("train", "val", "test")] == [30, 15, 15]
    tr = d["train"]
    assert tr.names == ["audio", "visual"] and tr.num_classes == 6
    assert tuple(tr.xs[0].shape[1:]) == (1, 8) and tuple(tr.xs[1].shape[1:]) == (3, 5)
    full_y = torch.tensor([CREMAD_CLASSES.index(emos[i % 6]) for i in range(n)])
    assert torch.equal(torch.cat([d[s].y for s in ("train", "val", "test")]).sort()[0], full_y.sort()[0])


def test_cremad_pickle_with_split_column_and_words(tmp_path):
    rng = np.random.default_rng(4)
    n = 20
    split = np.array(["train"] * 14 + ["test"] * 6)
    labels = np.array(["angry", "neutral", "happy", "sad", "fear", "disgust"] * 3 + ["angry", "sad"])
    path = tmp_path / "cremad.pkl"
    with open(path, "wb") as f:
        pickle.dump({"a": rng.normal(size=(n, 4, 2)), "video": rng.normal(size=(n, 2, 3)), "emotion": labels,
                     "split": split}, f)
    d = load_cremad(str(path), val_frac=0.3)
    assert len(d["test"]) == 6 and len(d["train"]) + len(d["val"]) == 14
    assert d["test"].y.tolist() == [CREMAD_CLASSES.index(c) for c in ("HAP", "SAD", "FEA", "DIS", "ANG", "SAD")]


def test_cremad_directory_of_split_files(tmp_path):
    rng = np.random.default_rng(5)
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        np.savez(tmp_path / f"{split}.npz", audio=rng.normal(size=(n, 7, 4)), visual=rng.normal(size=(n, 4)),
                 labels=np.arange(n) % 6)
    d = load_cremad(str(tmp_path))
    assert [len(d[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    assert d["val"].y.tolist() == [0, 1, 2, 3, 4, 5]


def test_cremad_errors(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, audio=np.zeros((3, 2)), labels=np.arange(3))
    with pytest.raises(ValueError, match="visual"):
        load_cremad(str(path))
    np.savez(path, audio=np.zeros((3, 2)), visual=np.zeros((3, 2)), labels=np.array([0, 1, 9]))
    with pytest.raises(ValueError, match="labels"):
        load_cremad(str(path))
    np.savez(path, audio=np.zeros((3, 2)), visual=np.zeros((3, 2)), labels=np.array(["NEU", "HAP", "BORED"]))
    with pytest.raises(ValueError, match="BORED"):
        load_cremad(str(path))
    np.savez(path, audio=np.zeros((3, 2)), visual=np.zeros((4, 2)), labels=np.arange(3))
    with pytest.raises(ValueError, match="samples"):
        load_cremad(str(path))
