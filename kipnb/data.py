"""Datasets: finding, verifying and parsing the image classification sets kipnb uses.

``load(name, split)`` returns a :class:`Dataset` with NHWC float32 images in [0, 1],
int32 labels and the class names, for

==================  =========================================  ====================
name                files                                      shape
==================  =========================================  ====================
``fashion_mnist``   the four idx files (``.gz`` or plain)      28 x 28 x 1, 10 cls
``mnist``           the four idx files (``.gz`` or plain)      28 x 28 x 1, 10 cls
``cifar10``         ``cifar-10-python.tar.gz`` (or extracted)  32 x 32 x 3, 10 cls
``cifar100``        ``cifar-100-python.tar.gz`` (or extracted) 32 x 32 x 3, 100 cls
``digits``          scikit-learn's bundled ``load_digits``     8 x 8 x 1, 10 cls
==================  =========================================  ====================

Where files are looked for, in order: the ``data_dir`` argument, ``$KIPNB_DATA_DIR``,
the Debian/Ubuntu system directory (``/usr/share/datasets/fashion-mnist`` from the
package ``dataset-fashion-mnist``), then the cache (``$XDG_CACHE_HOME/kipnb`` or
``~/.cache/kipnb``). In each directory both ``DIR/<file>`` and ``DIR/<name>/<file>``
are tried. When nothing is found and ``download=True``, the files are downloaded from
the dataset's canonical source into the cache; a download is kept only once its
sha256 matches.

Every file is verified before use (``verify=True``): its sha256 must equal the
canonical download's, or -- for idx files, which Debian ships recompressed -- the
sha256 of the decompressed content. A file that fails is never used; the error names
it and the fix. Parsers also check structure (magic numbers, sizes), so a truncated
file is reported as truncated even with ``verify=False``.

``prepare(name, preprocessing)`` loads both splits, fits a :mod:`kipnb.preprocess`
transform on the training split and returns one :class:`Data` in model space: the type
every method and evaluator takes (KIP, Label Solve, the experts, MTT/DATM,
:mod:`kipnb.evaluate`).

``digits`` has no official split: every fourth image (index % 4 == 3) is the test set,
which keeps all ten classes in both splits and is stable across library versions.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

__all__ = [
    "DATASETS",
    "EVAL_BLOCK",
    "ChecksumError",
    "CorruptDataError",
    "Data",
    "DataError",
    "DataNotFoundError",
    "Dataset",
    "cache_dir",
    "class_balanced_indices",
    "class_balanced_sample",
    "fetch",
    "load",
    "parse_idx",
    "prepare",
    "search_dirs",
]

SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DATA_DIR = "KIPNB_DATA_DIR"
SPLITS = ("train", "test")


# --------------------------------------------------------------------------- errors


class DataError(ValueError):
    """A problem with a dataset request or a data file; the message says how to fix it."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The dataset's files are nowhere kipnb looks, and could not be downloaded."""


class CorruptDataError(DataError):
    """A data file is truncated, corrupted or not in the expected format."""


class ChecksumError(CorruptDataError):
    """A data file's sha256 matches neither the canonical download nor its content."""


# --------------------------------------------------------------------- dataset specs


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset: canonical name, download URLs and checksums.

    ``sha256`` is the canonical download's; ``content_sha256``, where given, is the
    sha256 of the decompressed content (accepted too, since Debian recompresses).
    """

    name: str
    urls: tuple[str, ...]
    sha256: str
    content_sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    fmt: str  # "idx" | "cifar10" | "cifar100" | "sklearn"
    files: dict[str, FileSpec] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    system_dirs: tuple[Path, ...] = ()
    archive_dir: str = ""  # folder name inside a CIFAR tarball
    apt_package: str | None = None


_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URLS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

_IDX_KEYS = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# sha256 of the canonical downloads (as recorded by tensorflow-datasets) and of the
# decompressed content (computed from Debian's dataset-fashion-mnist package).
_FASHION_SHA = {
    "train_images": (
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train_labels": (
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "test_images": (
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "test_labels": (
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}
_MNIST_SHA = {
    "train_images": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train_labels": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "test_images": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "test_labels": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        title="Fashion-MNIST",
        fmt="idx",
        files={k: FileSpec(f, (_FASHION_URL + f,), *_FASHION_SHA[k]) for k, f in _IDX_KEYS.items()},
        class_names=FASHION_CLASSES,
        system_dirs=(SYSTEM_FASHION_MNIST_DIR,),
        apt_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST",
        fmt="idx",
        files={
            k: FileSpec(f, tuple(u + f for u in _MNIST_URLS), _MNIST_SHA[k])
            for k, f in _IDX_KEYS.items()
        },
        class_names=tuple(str(i) for i in range(10)),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        title="CIFAR-10",
        fmt="cifar10",
        files={
            "archive": FileSpec(
                "cifar-10-python.tar.gz",
                (_CIFAR_URL + "cifar-10-python.tar.gz",),
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            )
        },
        archive_dir="cifar-10-batches-py",
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        title="CIFAR-100",
        fmt="cifar100",
        files={
            "archive": FileSpec(
                "cifar-100-python.tar.gz",
                (_CIFAR_URL + "cifar-100-python.tar.gz",),
                "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
            )
        },
        archive_dir="cifar-100-python",
    ),
    "digits": DatasetSpec(
        name="digits",
        title="scikit-learn digits (8x8)",
        fmt="sklearn",
        class_names=tuple(str(i) for i in range(10)),
    ),
}


# --------------------------------------------------------------------------- Dataset


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset: ``images`` (N, H, W, C) float32 in [0, 1], ``labels`` (N,) int32."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    split: str
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, classes={self.num_classes})"
        )


# ----------------------------------------------------------------------- where to look


def cache_dir() -> Path:
    """The download cache: ``$XDG_CACHE_HOME/kipnb`` or ``~/.cache/kipnb``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kipnb"


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for dataset ``name``, in order (see the module docstring)."""
    spec = _spec(name)
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get(ENV_DATA_DIR):
        roots.append(Path(os.environ[ENV_DATA_DIR]).expanduser())
    roots.extend(spec.system_dirs)
    roots.append(cache_dir())
    dirs: list[Path] = []
    for root in roots:
        for d in (root, root / name):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _spec(name: str) -> DatasetSpec:
    if not isinstance(name, str) or name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise DataError(f"Unknown dataset {name!r}. Known datasets: {known}.")
    return DATASETS[name]


def _candidates(spec: DatasetSpec, fs: FileSpec, d: Path) -> list[Path]:
    names = [fs.name]
    if fs.name.endswith(".gz") and spec.fmt == "idx":
        names.append(fs.name[:-3])  # an uncompressed idx file is fine too
    return [d / n for n in names]


def _find(spec: DatasetSpec, dirs: Sequence[Path]) -> dict[str, Path] | None:
    """The first directory holding every file of ``spec``: {key: path}."""
    for d in dirs:
        found = {}
        for key, fs in spec.files.items():
            hit = next((p for p in _candidates(spec, fs, d) if p.is_file()), None)
            if hit is None:
                break
            found[key] = hit
        else:
            return found
    return None


def _find_extracted(spec: DatasetSpec, dirs: Sequence[Path]) -> Path | None:
    """An already extracted CIFAR folder (``cifar-10-batches-py`` etc.), if any."""
    for d in dirs:
        p = d / spec.archive_dir
        if p.is_dir():
            return p
    return None


# --------------------------------------------------------------------- verification


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gunzip(raw: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise CorruptDataError(
            f"{path} is not a readable gzip file ({e}): it is truncated or corrupted. "
            f"Delete it and fetch it again (python -m kipnb.data fetch <name>)."
        ) from None


def _read_verified(path: Path, fs: FileSpec, verify: bool) -> bytes:
    """The file's bytes (decompressed for .gz), after checking its sha256."""
    raw = path.read_bytes()
    is_gz = raw[:2] == b"\x1f\x8b"
    if verify and _sha256(raw) == fs.sha256:
        return _gunzip(raw, path) if is_gz and fs.name.endswith(".gz") else raw
    try:
        content = _gunzip(raw, path) if is_gz and fs.name.endswith(".gz") else raw
    except CorruptDataError:
        if not verify:
            raise
        content = b""  # unreadable: certainly not the canonical content
    if verify and not (fs.content_sha256 and _sha256(content) == fs.content_sha256):
        expected = fs.sha256 + (
            f" (or {fs.content_sha256} for the decompressed content)" if fs.content_sha256 else ""
        )
        raise ChecksumError(
            f"Checksum mismatch for {path}: sha256 {_sha256(raw)}, expected {expected}. "
            f"The file is corrupted, truncated or not the original {fs.name}; it was not used. "
            f"Delete it and fetch it again (python -m kipnb.data fetch <name>), or pass "
            f"verify=False to use a deliberately modified copy."
        )
    return content


# --------------------------------------------------------------------------- download


def _urlopen(url: str, timeout: float = 60.0):  # indirection: tests replace it
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (https/http URLs only)


def _download(fs: FileSpec, dest_dir: Path) -> Path:
    """Download ``fs`` into ``dest_dir``; keep it only if its sha256 matches."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / fs.name
    errors = []
    for url in fs.urls:
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{fs.name}.", suffix=".part")
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, _urlopen(url) as resp:
                while chunk := resp.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != fs.sha256:
                errors.append(f"{url}: sha256 {h.hexdigest()} != expected {fs.sha256}")
                continue
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise _DownloadFailed("; ".join(errors))


class _DownloadFailed(Exception):
    pass


def _not_found(spec: DatasetSpec, dirs: Sequence[Path], why: str) -> DataNotFoundError:
    files = ", ".join(fs.name for fs in spec.files.values())
    urls = " ".join(u for fs in spec.files.values() for u in fs.urls[:1])
    fixes = []
    if spec.apt_package:
        fixes.append(f"install the Debian/Ubuntu package: sudo apt-get install {spec.apt_package}")
    fixes.append(f"put the files in a directory and set ${ENV_DATA_DIR} to it (or pass data_dir=)")
    fixes.append(f"allow the download from {urls}")
    return DataNotFoundError(
        f"{spec.title} not found: looked for {files} in "
        + ", ".join(str(d) for d in dirs)
        + f". {why} Fix: "
        + "; or ".join(fixes)
        + "."
    )


def fetch(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> dict[str, Path]:
    """Locate (or download into the cache) the files of dataset ``name``: {key: path}.

    Files are not verified here; :func:`load` verifies every file it reads.
    """
    spec = _spec(name)
    if spec.fmt == "sklearn":
        return {}
    dirs = search_dirs(name, data_dir)
    found = _find(spec, dirs)
    if found is not None:
        return found
    if spec.fmt.startswith("cifar") and (ext := _find_extracted(spec, dirs)) is not None:
        return {"extracted": ext}
    if not download:
        raise _not_found(spec, dirs, "Downloading was disabled (download=False).")
    dest = cache_dir() / name
    out = {}
    try:
        for key, fs in spec.files.items():
            hit = next((p for p in _candidates(spec, fs, dest) if p.is_file()), None)
            out[key] = hit if hit is not None else _download(fs, dest)
    except _DownloadFailed as e:
        raise _not_found(spec, dirs, f"The download failed ({e}).") from None
    return out


# --------------------------------------------------------------------------- parsers


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the idx format (LeCun's MNIST files): magic, big-endian dims, then the data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise CorruptDataError(
            f"{source} is not an idx file (bad magic number {data[:4].hex()!r}). "
            f"Check that it is the original dataset file; delete it and fetch it again."
        )
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDataError(f"{source} is truncated: its idx header is incomplete.")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise CorruptDataError(
            f"{source} is {what}: {len(data)} bytes for shape {dims}, expected {expected}. "
            f"Delete it and fetch it again."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts, lists, numpy arrays) and nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        return super().find_class(module, name)


def _unpickle(data: bytes, source: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a bad file
        raise CorruptDataError(
            f"{source} is not a valid CIFAR python batch ({type(e).__name__}: {e}). "
            f"Delete the file and fetch it again."
        ) from None
    if not isinstance(obj, dict):
        raise CorruptDataError(f"{source}: expected a dict in the CIFAR batch, got {type(obj)}.")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_members(spec: DatasetSpec, split: str) -> tuple[list[str], str]:
    if spec.fmt == "cifar10":
        batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return batches, "batches.meta"
    return [split], "meta"


def _read_cifar_members(
    spec: DatasetSpec, files: dict[str, Path], names: list[str], verify: bool
) -> dict[str, bytes]:
    if "extracted" in files:
        out = {}
        for n in names:
            p = files["extracted"] / n
            if not p.is_file():
                raise CorruptDataError(
                    f"{files['extracted']} lacks {n}: the extracted {spec.title} folder is "
                    f"incomplete. Delete it and extract the archive again."
                )
            out[n] = p.read_bytes()
        return out
    path = files["archive"]
    raw = _read_verified(path, spec.files["archive"], verify)
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
            out = {}
            for n in names:
                try:
                    member = tar.extractfile(f"{spec.archive_dir}/{n}")
                except KeyError:
                    member = None
                if member is None:
                    raise CorruptDataError(
                        f"{path} has no member {spec.archive_dir}/{n}: not a {spec.title} "
                        f"python archive. Delete it and fetch it again."
                    )
                out[n] = member.read()
            return out
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise CorruptDataError(
            f"{path} is not a readable tar.gz archive ({e}): it is truncated or corrupted. "
            f"Delete it and fetch it again."
        ) from None


def _load_cifar(spec: DatasetSpec, split: str, files: dict[str, Path], verify: bool):
    batches, meta_name = _cifar_members(spec, split)
    raw = _read_cifar_members(spec, files, [*batches, meta_name], verify)
    label_key = "labels" if spec.fmt == "cifar10" else "fine_labels"
    names_key = "label_names" if spec.fmt == "cifar10" else "fine_label_names"
    xs, ys = [], []
    for b in batches:
        d = _unpickle(raw[b], f"{spec.title} {b}")
        if "data" not in d or label_key not in d:
            raise CorruptDataError(f"{spec.title} {b} lacks 'data' or {label_key!r}.")
        x = np.asarray(d["data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != y.shape[0]:
            raise CorruptDataError(
                f"{spec.title} {b} has data of shape {x.shape} and {y.shape[0]} labels; "
                f"expected (n, 3072) and n labels."
            )
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y)
    meta = _unpickle(raw[meta_name], f"{spec.title} {meta_name}")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, []))
    return np.concatenate(xs), np.concatenate(ys), names


def _load_idx(spec: DatasetSpec, split: str, files: dict[str, Path], verify: bool):
    ik, lk = f"{split}_images", f"{split}_labels"
    x = parse_idx(_read_verified(files[ik], spec.files[ik], verify), str(files[ik]))
    y = parse_idx(_read_verified(files[lk], spec.files[lk], verify), str(files[lk]))
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise CorruptDataError(
            f"{spec.title} {split}: images of shape {x.shape} do not match labels of shape "
            f"{y.shape} (expected (n, H, W) and (n,)). Delete the files and fetch them again."
        )
    return x[..., None], y, spec.class_names


def _load_digits(split: str):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    test = np.arange(len(d.target)) % 4 == 3
    keep = test if split == "test" else ~test
    return x[keep], d.target[keep], tuple(str(i) for i in range(10))


def load(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    verify: bool = True,
) -> Dataset:
    """Load one split (``'train'`` or ``'test'``) of dataset ``name``.

    Returns images (N, H, W, C) float32 in [0, 1], labels (N,) int32 and class names.
    See the module docstring for where files are looked for and how they are verified.
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r} for {name!r}: use one of {SPLITS}.")
    if spec.fmt == "sklearn":
        x, y, names = _load_digits(split)
        source = "sklearn.datasets.load_digits"
    else:
        files = fetch(name, data_dir, download=download)
        loader = _load_idx if spec.fmt == "idx" else _load_cifar
        x, y, names = loader(spec, split, files, verify)
        source = str(next(iter(files.values())).parent)
    images = np.asarray(x, dtype=np.float32)
    if np.issubdtype(np.asarray(x).dtype, np.integer):
        images /= 255.0
    labels = np.asarray(y, dtype=np.int32)
    names = tuple(names) or tuple(str(i) for i in range(int(labels.max()) + 1))
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise CorruptDataError(
            f"{spec.title} {split}: labels span [{labels.min()}, {labels.max()}] but there are "
            f"{len(names)} classes. Delete the files and fetch them again."
        )
    return Dataset(images, labels, names, name, split, source)


# ------------------------------------------------------------ class-balanced sampling


def class_balanced_indices(
    key: jax.Array, labels: np.ndarray, n_per_class: int, num_classes: int | None = None
) -> np.ndarray:
    """Indices of ``n_per_class`` distinct examples of every class, drawn with ``key``.

    Classes come in order (all of class 0, then class 1, ...). Deterministic for a key.
    """
    labels = np.asarray(labels)
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int | np.integer):
        raise DataError(f"n_per_class must be an integer, got {n_per_class!r}.")
    if n_per_class <= 0:
        raise DataError(f"n_per_class must be positive, got {n_per_class}.")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = np.bincount(labels, minlength=num_classes)
    smallest = int(np.argmin(counts))
    if n_per_class > counts[smallest]:
        raise DataError(
            f"Cannot draw {n_per_class} images per class: class {smallest} has only "
            f"{counts[smallest]}. Use at most {counts[smallest]} images per class."
        )
    keys = jax.random.split(key, num_classes)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        perm = np.asarray(jax.random.permutation(keys[c], len(idx)))
        out.append(np.sort(idx[perm[:n_per_class]]))
    return np.concatenate(out)


def class_balanced_sample(
    key: jax.Array, dataset: Dataset, n_per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``n_per_class`` examples of each class of ``dataset``."""
    idx = class_balanced_indices(key, dataset.labels, n_per_class, dataset.num_classes)
    return dataset.images[idx], dataset.labels[idx]


# ------------------------------------------------------------- prepared data (model space)

#: Test images per block of :meth:`Data.device` (the padded test set's block size).
EVAL_BLOCK = 1000


@dataclass(frozen=True, eq=False)
class Data:
    """A dataset prepared for a learner: both splits in model space and the fitted transform.

    What :func:`prepare` returns, and what every method (KRR, Label Solve, KIP, the
    experts, MTT/DATM) and evaluator (:mod:`kipnb.evaluate`) takes.

    Attributes:
      x_train, x_test: float32 NHWC images in model space (``transform.apply`` of the
        pixels).
      y_train, y_test: int32 classes (also readable as ``labels_train`` /
        ``labels_test``).
      transform: the fitted :mod:`kipnb.preprocess` transform from pixels to model space
        (``apply``, ``invert``); None for data built directly in model space.
      class_names: one name per class (empty: ``num_classes`` is the largest label + 1).
      dataset: the :mod:`kipnb.data` dataset name (``name`` is the same).

    Example:
      >>> import numpy as np
      >>> x = np.zeros((4, 2, 2, 1), np.float32)
      >>> d = Data(x, np.array([0, 1, 2, 0]), x, np.array([1, 1, 0, 2]), dataset="toy")
      >>> d.num_classes, d.image_shape, d.labels_test.tolist()
      (3, (2, 2, 1), [1, 1, 0, 2])
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    transform: object = None
    class_names: tuple[str, ...] = ()
    dataset: str = "custom"

    def __post_init__(self):
        arrays = {}
        for split in ("train", "test"):
            x = np.asarray(getattr(self, f"x_{split}"), dtype=np.float32)
            y = np.asarray(getattr(self, f"y_{split}"))
            if x.ndim != 4:
                raise ValueError(
                    f"x_{split} must be NHWC images (N, H, W, C), got shape {x.shape}. Add a "
                    f"channel axis (x[..., None]) for grayscale images."
                )
            if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    f"y_{split} must be ({x.shape[0]},) integer classes, got "
                    f"{y.dtype}{list(y.shape)}."
                )
            if x.shape[0] == 0:
                raise ValueError(f"x_{split} is empty.")
            arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int32)
        if arrays["x_test"].shape[1:] != arrays["x_train"].shape[1:]:
            raise ValueError(
                f"Training images are {arrays['x_train'].shape[1:]} but test images are "
                f"{arrays['x_test'].shape[1:]}."
            )
        for k, v in arrays.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        c = self.num_classes
        for split in ("train", "test"):
            y = arrays[f"y_{split}"]
            if y.min() < 0 or y.max() >= c:
                raise ValueError(
                    f"y_{split} spans [{y.min()}, {y.max()}] but there are {c} classes "
                    f"(class_names)."
                )

    @property
    def labels_train(self) -> np.ndarray:
        """``y_train``."""
        return self.y_train

    @property
    def labels_test(self) -> np.ndarray:
        """``y_test``."""
        return self.y_test

    @property
    def name(self) -> str:
        """``dataset``."""
        return self.dataset

    @property
    def num_classes(self) -> int:
        if self.class_names:
            return len(self.class_names)
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def preprocessing(self) -> str:
        """The :func:`kipnb.preprocess.method_name` of ``transform`` (e.g. ``'zca_kornia'``)."""
        from kipnb import preprocess

        return preprocess.method_name(self.transform)

    def fingerprint(self) -> str:
        """A short hash of the training data, stored in checkpoints to catch mix-ups."""
        from kipnb import checkpoint

        return checkpoint.data_fingerprint(self.x_train, self.y_train)

    def device(self) -> dict:
        """The arrays as device arrays, made once and then cached on this object.

        Returns:
          ``dict(x_train, y_train, x_test, y_test, block)``: the test set padded to a
          multiple of ``block = min(EVAL_BLOCK, n_test)`` images, with label -1 on the
          padding (so a count of correct predictions over the padded blocks is exact).
        """
        cache = self.__dict__.get("_device_cache")
        if cache is None:
            n = len(self.x_test)
            block = min(EVAL_BLOCK, n)
            pad = -n % block
            x_t = np.concatenate([self.x_test, np.zeros((pad, *self.image_shape), np.float32)])
            y_t = np.concatenate([self.y_test, np.full((pad,), -1, np.int32)])
            cache = {"x_train": jax.numpy.asarray(self.x_train),
                     "y_train": jax.numpy.asarray(self.y_train),
                     "x_test": jax.numpy.asarray(x_t), "y_test": jax.numpy.asarray(y_t),
                     "block": block}
            object.__setattr__(self, "_device_cache", cache)
        return cache


def prepare(
    dataset: str = "fashion_mnist",
    preprocessing: str = "standardize",
    *,
    zca_reg: float = 0.1,
    data_dir: str | os.PathLike | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Data:
    """Load ``dataset``, fit ``preprocessing`` on its training split, apply it to both.

    Args:
      dataset: a name of :data:`DATASETS`.
      preprocessing: a :func:`kipnb.preprocess.make` method: ``'standardize'``
        (per-channel), ``'zca'`` (KIP's relative ZCA), ``'zca_kornia'`` (MTT's and
        DATM's ZCA of the [0, 1] pixels, absolute ``eps = zca_reg``), ``'layernorm_zca'``
        (KIP's CIFAR preprocessing), ``'standardize_zca'`` or ``'none'``.
      zca_reg: the ZCA regularizer (KIP and MTT: 0.1).
      data_dir: where to look for the files first (see :func:`load`).
      n_train, n_test: keep only the first images of each split (quick experiments;
        the transform is fitted on the kept training images).

    Returns:
      A :class:`Data`, float32 images in model space.

    Example:
      >>> d = prepare("digits", "zca_kornia", n_train=300, n_test=50)
      >>> d.x_train.shape, d.preprocessing, d.num_classes
      ((300, 8, 8, 1), 'zca_kornia', 10)
    """
    from kipnb import preprocess

    transform = preprocess.make(preprocessing, zca_reg=zca_reg)
    train = load(dataset, "train", data_dir)
    test = load(dataset, "test", data_dir)
    x_tr, y_tr, x_te, y_te = train.images, train.labels, test.images, test.labels
    if n_train is not None:
        x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    if n_test is not None:
        x_te, y_te = x_te[:n_test], y_te[:n_test]
    transform = transform.fit(x_tr)
    return Data(
        x_train=np.asarray(transform.apply(x_tr), np.float32),
        y_train=np.asarray(y_tr, np.int32),
        x_test=np.asarray(transform.apply(x_te), np.float32),
        y_test=np.asarray(y_te, np.int32),
        transform=transform,
        class_names=tuple(train.class_names),
        dataset=dataset,
    )


# ------------------------------------------------------------------ system packages


def _command(argv: Sequence[str]) -> subprocess.CompletedProcess:  # indirection: tests replace it
    return subprocess.run(
        list(argv), capture_output=True, text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def apt_prefix() -> list[str] | None:
    """How this process can run ``apt-get``: ``[]`` as root, ``["sudo", "-n"]`` where sudo
    needs no password, ``None`` where it cannot (no apt-get, or no privileges)."""
    if shutil.which("apt-get") is None:
        return None
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return []
    if shutil.which("sudo") and _command(["sudo", "-n", "true"]).returncode == 0:
        return ["sudo", "-n"]
    return None


def install_system_package(name: str, log=print) -> tuple[bool, str]:
    """Install dataset ``name``'s Debian/Ubuntu package with apt-get, where that is possible.

    Used by ``python -m kipnb.data fetch`` (``make data``); :func:`load` never installs
    anything. Runs ``apt-get install -y PACKAGE`` (after ``apt-get update`` if the first
    try fails), as root or through ``sudo -n``.

    Args:
        name: a dataset with a system package (``fashion_mnist``).
        log: called with one line saying what is being done.

    Returns:
        ``(installed, why)``: whether the package is now installed, and a sentence saying
        what happened (for an error message when it is not).

    Example:
        >>> ok, why = install_system_package("digits")  # digits ship with scikit-learn
        >>> ok, why
        (False, 'digits has no system package.')
    """
    spec = _spec(name)
    if not spec.apt_package:
        return False, f"{name} has no system package."
    prefix = apt_prefix()
    if prefix is None:
        return False, (
            f"apt-get could not be used to install {spec.apt_package} (no apt-get, or not "
            "root and sudo asks for a password)."
        )
    log(f"{spec.title} not found: installing the Debian package {spec.apt_package} "
        f"({' '.join(prefix + ['apt-get', 'install', '-y', spec.apt_package])}) ...")
    install = prefix + ["apt-get", "install", "-y", "-q", spec.apt_package]
    r = _command(install)
    if r.returncode != 0:
        _command(prefix + ["apt-get", "update", "-q"])
        r = _command(install)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout or "").strip().splitlines()[-1:] or ["no output"]
        return False, f"apt-get install {spec.apt_package} failed: {tail[0]}"
    log(f"installed {spec.apt_package}.")
    return True, f"installed {spec.apt_package}."


# ----------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kipnb.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser(
        "fetch",
        help="find a dataset; if it is missing, install its Debian package (when apt-get "
        "is usable) or download it; verify it",
    )
    f.add_argument("name", choices=sorted(DATASETS))
    f.add_argument("--data-dir", default=None)
    f.add_argument("--no-download", action="store_true")
    f.add_argument("--no-apt", action="store_true", help="never run apt-get")
    args = p.parse_args(argv)
    apt_note = ""
    try:
        try:
            fetch(args.name, args.data_dir, download=False)
        except DataNotFoundError:
            if not args.no_apt and _spec(args.name).apt_package:
                ok, apt_note = install_system_package(args.name)
                if not ok:
                    print(f"note: {apt_note} Trying the download instead.", file=sys.stderr)
        for split in SPLITS:
            ds = load(args.name, split, args.data_dir, download=not args.no_download)
            print(f"{ds!r} from {ds.source}")
    except DataError as e:
        msg = f"error: {e}"
        if apt_note and isinstance(e, DataNotFoundError):
            msg += f" ({apt_note})"
        print(msg, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
