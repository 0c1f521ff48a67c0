"""``DistilledSet``: the one format every distillation method writes and every evaluator reads.

A distilled set is images, labels (integer classes or soft/learned label vectors) and
metadata: the method, the dataset, images per class, the preprocessing recipe
(:meth:`kipnb.preprocess.Pipeline.recipe`), the method's config, and free-form extras.
Methods may attach named arrays (a learned learning rate, say) in ``arrays``.

It is saved as one ``.npz`` that plain NumPy reads without pickle::

    z = np.load("set.npz")
    z["images"], z["labels"], json.loads(str(z["meta"]))

Writes are atomic (a temporary file in the same directory, flushed, then renamed over
the destination), so an interrupted save never leaves a half-written file, and an
existing file is only replaced when ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT_VERSION", "DistilledSet", "atomic_write_bytes"]

FORMAT_VERSION = 1
_RESERVED = {"images", "labels", "meta"}


def atomic_write_bytes(path: str | os.PathLike, writer, overwrite: bool = True) -> Path:
    """Write a file atomically: ``writer(fileobj)`` fills a temp file that is then renamed.

    The temp file lives in the destination directory (so the rename is atomic) and is
    removed if ``writer`` raises; the destination is untouched until the rename.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True to replace it, or choose another path."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _jsonable(obj: Any) -> Any:
    """Make configs JSON-able: dataclasses, numpy scalars and arrays, tuples, paths."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return repr(obj)


@dataclass(frozen=True, eq=False)
class DistilledSet:
    """A distilled dataset: ``images`` (N, H, W, C) and ``labels`` (N,) ints or (N, K) floats."""

    images: np.ndarray
    labels: np.ndarray
    method: str
    dataset: str
    ipc: int
    preprocessing: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)

    def __post_init__(self):
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C); got shape {images.shape}.")
        if labels.ndim not in (1, 2) or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be (N,) class indices or (N, K) label vectors with N = "
                f"{images.shape[0]} images; got shape {labels.shape}."
            )
        bad = _RESERVED & set(self.arrays)
        if bad:
            raise ValueError(f"arrays may not use the reserved names {sorted(bad)}.")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        if self.labels.ndim == 2:
            return int(self.labels.shape[1])
        return int(self.labels.max()) + 1

    @property
    def hard_labels(self) -> np.ndarray:
        """Integer classes (argmax of label vectors)."""
        return self.labels if self.labels.ndim == 1 else self.labels.argmax(axis=1)

    def meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "dataset": self.dataset,
            "ipc": int(self.ipc),
            "preprocessing": _jsonable(self.preprocessing),
            "config": _jsonable(self.config),
            "extra": _jsonable(self.extra),
            "arrays": sorted(self.arrays),
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write one ``.npz`` atomically; refuses to replace a file unless ``overwrite``."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: a DistilledSet is saved as a .npz file.")
        payload = {
            "images": self.images,
            "labels": self.labels,
            "meta": np.asarray(json.dumps(self.meta())),
            **{k: np.asarray(v) for k, v in self.arrays.items()},
        }
        return atomic_write_bytes(path, lambda f: np.savez(f, **payload), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DistilledSet:
        """Read a set written by :meth:`save` (no pickle involved)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = _RESERVED - set(z.files)
                if missing:
                    raise ValueError(
                        f"{path} is not a DistilledSet file: it lacks {sorted(missing)}."
                    )
                meta = json.loads(str(z["meta"]))
                images, labels = z["images"], z["labels"]
                arrays = {k: z[k] for k in meta.get("arrays", [])}
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
            if isinstance(e, ValueError) and "DistilledSet" in str(e):
                raise
            raise ValueError(f"{path} could not be read as a DistilledSet .npz: {e}") from None
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer kipnb (format {meta['format_version']}); "
                f"upgrade kipnb to read it."
            )
        return cls(
            images=images,
            labels=labels,
            method=meta["method"],
            dataset=meta["dataset"],
            ipc=meta["ipc"],
            preprocessing=meta.get("preprocessing", {}),
            config=meta.get("config", {}),
            extra=meta.get("extra", {}),
            arrays=arrays,
        )
