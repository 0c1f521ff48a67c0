"""DistilledSet: one .npz, atomic writes, readable with plain NumPy."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest

from kipnb.distilled import DistilledSet, atomic_write_bytes


@dataclass(frozen=True)
class Cfg:
    lr: float = 0.01
    steps: int = 3
    arch: tuple = ("fc", 3)


def make_set(soft=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8, 8, 1)).astype(np.float32)
    y = rng.normal(size=(20, 10)).astype(np.float32) if soft else np.repeat(np.arange(10), 2)
    return DistilledSet(
        x, y, "kip", "digits", 2,
        preprocessing={"kind": "zca", "reg": 0.1, "relative": True},
        config=Cfg(),
        extra={"final_loss": np.float32(0.25)},
        arrays={"syn_lr": np.array(0.01, np.float32)},
    )  # fmt: skip


@pytest.mark.parametrize("soft", [False, True])
def test_roundtrip(tmp_path, soft):
    s = make_set(soft)
    path = s.save(tmp_path / "set.npz")
    t = DistilledSet.load(path)
    np.testing.assert_array_equal(t.images, s.images)
    np.testing.assert_array_equal(t.labels, s.labels)
    assert (t.method, t.dataset, t.ipc) == ("kip", "digits", 2)
    assert t.config == {"lr": 0.01, "steps": 3, "arch": ["fc", 3]}
    assert t.extra["final_loss"] == 0.25 and t.preprocessing["reg"] == 0.1
    assert float(t.arrays["syn_lr"]) == pytest.approx(0.01)
    np.testing.assert_array_equal(t.hard_labels, s.hard_labels)
    assert t.num_classes == 10


def test_saved_file_has_ordinary_permissions(tmp_path):
    path = make_set().save(tmp_path / "set.npz")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_readable_with_plain_numpy(tmp_path):
    make_set().save(tmp_path / "set.npz")
    with np.load(tmp_path / "set.npz", allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert z["images"].shape == (20, 8, 8, 1) and meta["method"] == "kip"
        assert meta["format_version"] == 1 and meta["arrays"] == ["syn_lr"]


def test_never_overwrites_without_asking(tmp_path):
    path = make_set().save(tmp_path / "set.npz")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_set(soft=True).save(path)
    assert path.read_bytes() == before
    make_set(soft=True).save(path, overwrite=True)
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


def test_truncated_file_is_reported(tmp_path):
    path = make_set().save(tmp_path / "set.npz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="could not be read as a DistilledSet"):
        DistilledSet.load(path)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(
        ValueError, match=r"not a DistilledSet file: it lacks \['images', 'labels', 'meta'\]"
    ):
        DistilledSet.load(tmp_path / "other.npz")


def test_shape_errors(tmp_path):
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, C\)"):
        DistilledSet(np.zeros((4, 8)), np.zeros(4, int), "ls", "digits", 1)
    with pytest.raises(ValueError, match="with N = 4 images; got shape"):
        DistilledSet(np.zeros((4, 8, 8, 1)), np.zeros(5, int), "ls", "digits", 1)
    with pytest.raises(ValueError, match="saved as a .npz"):
        make_set().save(tmp_path / "set.json")
