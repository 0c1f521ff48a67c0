"""Shared test helpers: writers for the dataset file formats, and isolation from the
user's environment (no network, a private cache, no $KIPNB_DATA_DIR)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "agg")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """No test touches the network, the user's cache or $KIPNB_DATA_DIR."""
    from kipnb import data

    def no_network(url, timeout=60.0):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(data, "_urlopen", no_network)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("KIPNB_DATA_DIR", raising=False)


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format: 0, 0, dtype code (0x08 = ubyte), ndim, big-endian dims, data."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_idx_set(directory: Path, n_train=30, n_test=20, size=28, gz=True, seed=0):
    """Write the four MNIST-style idx files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, a in arrays.items():
        raw = idx_bytes(a)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return arrays


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)  # the CIFAR files are protocol-2 pickles


def cifar_members(kind: str, n_per_batch: int = 4, seed: int = 0) -> dict[str, bytes]:
    """Members of cifar-10-batches-py/ or cifar-100-python/ as bytes."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        members = {}
        for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
            members[name] = _pickle(
                {
                    b"batch_label": name.encode(),
                    b"labels": [int(v) for v in (np.arange(n_per_batch) + i) % 10],
                    b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                }
            )
        members["batches.meta"] = _pickle(
            {
                b"label_names": [f"class{i}".encode() for i in range(10)],
                b"num_vis": 3072,
            }
        )
        return members
    members = {}
    for name, n in (("train", 5 * n_per_batch), ("test", n_per_batch)):
        members[name] = _pickle(
            {
                b"fine_labels": [int(v) for v in np.arange(n) % 100],
                b"coarse_labels": [int(v) for v in np.arange(n) % 20],
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            }
        )
    members["meta"] = _pickle(
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
    )
    return members


def write_cifar(directory: Path, kind: str = "cifar10", extracted: bool = False, **kw) -> Path:
    """Write a small CIFAR python archive (or its extracted folder) into ``directory``."""
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    members = cifar_members(kind, **kw)
    directory.mkdir(parents=True, exist_ok=True)
    if extracted:
        (directory / folder).mkdir()
        for name, b in members.items():
            (directory / folder / name).write_bytes(b)
        return directory / folder
    path = directory / (
        "cifar-10-python.tar.gz" if kind == "cifar10" else "cifar-100-python.tar.gz"
    )
    with tarfile.open(path, "w:gz") as tar:
        for name, b in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    return path
