"""DistilledSet format 2: one .npz, atomic writes, readable with plain NumPy, the fitted
transform round trip, format-1 files, and errors that name what is wrong."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest

from kipnb import preprocess
from kipnb.distilled import DistilledSet, atomic_write_bytes


@dataclass(frozen=True)
class Cfg:
    lr: float = 0.01
    steps: int = 3
    arch: tuple = ("fc", 3)


def pixels(n=20, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, 8, 8, 1)).astype(np.float32)


def fitted(method="layernorm_zca"):
    return preprocess.make(method, zca_reg=0.1).fit(pixels(200, seed=1))


def make_set(kind="class", transform=None):
    rng = np.random.default_rng(0)
    t = fitted() if transform is None else transform
    x = t.apply(pixels())
    if kind == "class":
        y = np.repeat(np.arange(10), 2)
    else:
        y = rng.normal(size=(20, 10)).astype(np.float32)
    return DistilledSet(
        x, y, label_kind=kind, num_classes=10, classes=np.repeat(np.arange(10), 2),
        transform=t, lr=0.02 if kind == "logits" else None,
        source={"method": "kip", "dataset": "digits", "ipc": 2, "config": Cfg(),
                "learner": "fc3-ntk", "data_fingerprint": "abc"},
        extra={"final_loss": np.float32(0.25)},
        arrays={"syn_steps": np.array(3)},
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["class", "regression", "logits"])
def test_roundtrip(tmp_path, kind):
    s = make_set(kind)
    t = DistilledSet.load(s.save(tmp_path / "set.npz"))
    np.testing.assert_array_equal(t.images, s.images)
    np.testing.assert_array_equal(t.labels, s.labels)
    np.testing.assert_array_equal(t.classes, s.classes)
    assert (t.method, t.dataset, t.ipc, t.label_kind) == ("kip", "digits", 2, kind)
    assert t.source["config"] == {"lr": 0.01, "steps": 3, "arch": ["fc", 3]}
    assert t.source["kipnb_version"] == s.source["kipnb_version"]
    assert t.extra["final_loss"] == 0.25 and int(t.arrays["syn_steps"]) == 3
    assert t.lr == s.lr and t.num_classes == 10
    assert t.preprocessing == s.preprocessing


def test_transform_round_trip_is_exact(tmp_path):
    """The fitted transform is stored bit for bit; to_pixels and transform invert each other."""
    for method in ("standardize", "zca", "layernorm_zca", "none"):
        s = make_set(transform=fitted(method))
        t = DistilledSet.load(s.save(tmp_path / f"{method}.npz"))
        probe = pixels(5, seed=3)
        np.testing.assert_array_equal(t.transform.apply(probe), s.transform.apply(probe))
        np.testing.assert_array_equal(t.to_pixels(), s.to_pixels())
        np.testing.assert_allclose(t.transform.apply(t.to_pixels()), t.images, atol=2e-5)
        assert preprocess.equal(t.transform, s.transform)
    assert not preprocess.equal(fitted("standardize"), fitted("zca"))


def test_num_classes_is_stored_not_guessed(tmp_path):
    ds = DistilledSet(np.zeros((3, 2, 2, 1)), np.array([0, 1, 2]), label_kind="class",
                      num_classes=10)
    assert DistilledSet.load(ds.save(tmp_path / "s.npz")).num_classes == 10
    with pytest.raises(ValueError, match="needs num_classes"):
        DistilledSet(np.zeros((3, 2, 2, 1)), np.array([0, 1, 2]), label_kind="class")


def test_saved_file_has_ordinary_permissions(tmp_path):
    path = make_set().save(tmp_path / "set.npz")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_readable_with_plain_numpy(tmp_path):
    make_set("logits").save(tmp_path / "set.npz")
    with np.load(tmp_path / "set.npz", allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert z["images"].shape == (20, 8, 8, 1) and meta["source"]["method"] == "kip"
        assert meta["format_version"] == 2 and meta["arrays"] == ["syn_steps"]
        assert meta["label_kind"] == "logits" and meta["lr"] == 0.02
        assert z["classes"].tolist() == np.repeat(np.arange(10), 2).tolist()
        assert meta["transform"]["kind"] == "pipeline"
        assert "transform.1.eigenvectors" in z.files


def test_never_overwrites_without_asking(tmp_path):
    path = make_set().save(tmp_path / "set.npz")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_set("regression").save(path)
    assert path.read_bytes() == before
    make_set("regression").save(path, overwrite=True)
    assert DistilledSet.load(path).labels.ndim == 2


def test_failed_write_keeps_the_old_file(tmp_path):
    path = make_set().save(tmp_path / "set.npz")
    before = path.read_bytes()

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, boom)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["set.npz"]  # no temp file left behind


def test_bad_files_are_named(tmp_path):
    path = make_set().save(tmp_path / "set.npz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="could not be read as a DistilledSet"):
        DistilledSet.load(path)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match=r"it lacks \['images', 'labels', 'meta'\]"):
        DistilledSet.load(tmp_path / "other.npz")

    def rewrite(name, **changes):
        with np.load(make_set().save(tmp_path / f"{name}.npz"), allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        meta = json.loads(str(d["meta"]))
        for k, v in changes.items():
            if k == "drop":
                d.pop(v)
            elif v is None:
                meta.pop(k)
            else:
                meta[k] = v
        d["meta"] = np.asarray(json.dumps(meta) if name != "notjson" else "{oops")
        np.savez(tmp_path / f"{name}.npz", **d)
        return tmp_path / f"{name}.npz"

    cases = {
        "notjson": ({}, "'meta' entry is not JSON"),
        "newer": ({"format_version": 3}, "newer kipnb .format 3"),
        "kind": ({"label_kind": "soft"}, "label_kind='soft': use one of"),
        "nokind": ({"label_kind": None}, "meta lacks 'label_kind'"),
        "arrays": ({"arrays": ["syn_steps", "lost"]}, r"arrays \['lost'\] named in meta"),
        "transform": ({"drop": "transform.1.eigenvectors"}, "lacks its array 'eigenvectors'"),
        "classes": ({"drop": "classes"}, "lacks 'classes'"),
        "ncls": ({"num_classes": 5}, r"labels span \[0, 9\], not \[0, 5\)"),
    }
    for name, (changes, msg) in cases.items():
        p = rewrite(name, **changes)
        with pytest.raises(ValueError, match=rf"{name}.npz is not a valid DistilledSet file: .*{msg}"):
            DistilledSet.load(p)


def _format1(path, images, labels, method, dataset, ipc, extra=None, arrays=None):
    """Write a file exactly as kipnb's format 1 did."""
    arrays = arrays or {}
    meta = {"format_version": 1, "method": method, "dataset": dataset, "ipc": ipc,
            "preprocessing": {"kind": "pipeline", "steps": [{"kind": "standardize"}]},
            "config": {"steps": 3}, "extra": extra or {}, "arrays": sorted(arrays)}
    np.savez(path, images=images, labels=labels, meta=np.asarray(json.dumps(meta)), **arrays)
    return path


def test_format1_files_load(tmp_path):
    x = pixels()
    y = np.random.default_rng(0).normal(size=(20, 10)).astype(np.float32)
    kip1 = DistilledSet.load(_format1(tmp_path / "kip.npz", x, y, "kip", "digits", 2,
                                      arrays={"model_images": x * 2}))
    assert kip1.label_kind == "regression" and kip1.transform is None
    np.testing.assert_array_equal(kip1.images, x)  # format 1 images are pixels
    np.testing.assert_array_equal(kip1.classes, y.argmax(1))
    assert kip1.source["format"] == 1 and "model_images" in kip1.arrays
    datm = DistilledSet.load(_format1(
        tmp_path / "datm.npz", x, y, "datm", "digits", 2, extra={"lr": 0.03, "soft_labels": True},
        arrays={"classes": np.repeat(np.arange(10), 2)}))
    assert datm.label_kind == "logits" and datm.lr == pytest.approx(0.03)
    np.testing.assert_array_equal(datm.classes, np.repeat(np.arange(10), 2))
    ints = np.repeat(np.arange(3), 2)  # classes 0..2 only, but digits has 10 classes
    mtt = DistilledSet.load(_format1(tmp_path / "mtt.npz", x[:6], ints, "mtt", "digits", 2))
    assert mtt.label_kind == "class" and mtt.num_classes == 10
    _format1(tmp_path / "odd.npz", x[:6], ints, "mtt", "mystery", 2)
    with pytest.raises(ValueError, match="pass num_classes= to DistilledSet.load"):
        DistilledSet.load(tmp_path / "odd.npz")
    assert DistilledSet.load(tmp_path / "odd.npz", num_classes=4).num_classes == 4


def test_shape_errors(tmp_path):
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, C\)"):
        DistilledSet(np.zeros((4, 8)), np.zeros(4, int), "class", 10)
    with pytest.raises(ValueError, match="with N = 4 images; got"):
        DistilledSet(np.zeros((4, 8, 8, 1)), np.zeros(5, int), "class", 10)
    with pytest.raises(ValueError, match=r"needs \(N, C\) label vectors"):
        DistilledSet(np.zeros((4, 8, 8, 1)), np.zeros(4), "regression")
    with pytest.raises(ValueError, match="lr must be a positive"):
        DistilledSet(np.zeros((4, 8, 8, 1)), np.zeros(4, int), "class", 10, lr=-1.0)
    with pytest.raises(ValueError, match="not fitted"):
        DistilledSet(np.zeros((4, 8, 8, 1)), np.zeros(4, int), "class", 10,
                     transform=preprocess.make("standardize"))
    with pytest.raises(ValueError, match="saved as a .npz"):
        make_set().save(tmp_path / "set.json")
