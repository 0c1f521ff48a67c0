"""``DistilledSet``: the one format every distillation method writes and every evaluator reads.

A distilled set (format 2) holds

* ``images`` (N, H, W, C) **in the space the learner consumed** (model space: after
  the preprocessing), and ``transform``, the fitted :mod:`kipnb.preprocess` transform
  that maps pixels to that space (None: the images are pixels). ``ds.to_pixels()`` is
  ``transform.invert(images)``, and ``ds.transform.apply(ds.to_pixels())`` gives the
  images back (up to float32 rounding); the transform itself is stored bit for bit.
* ``labels`` and ``label_kind``, which says what they mean:

  ============== ============ ==========================================================
  label_kind     labels       meaning
  ============== ============ ==========================================================
  ``"class"``    (N,) ints    hard classes (MTT, random real images)
  ``"regression"`` (N, C)     KRR targets, learned (KIP) or solved (Label Solve);
                              one-hot minus 1/C before learning
  ``"logits"``   (N, C)       soft labels as logits (DATM): the distribution is softmax
  ============== ============ ==========================================================

* ``classes`` (N,) the class each image was made for (KIP's learned labels may argmax
  elsewhere), and ``num_classes`` (stored, never guessed from the labels).
* ``lr``: the learned learning rate (MTT, DATM), or None.
* ``source``: where the set came from: ``method``, ``learner`` (the kernel or network
  it was distilled for), ``config``, ``dataset``, ``ipc``, ``data_fingerprint`` (of the
  training data, :func:`kipnb.checkpoint.data_fingerprint`), ``kipnb_version``.
* ``extra`` (JSON-able) and ``arrays`` (named NumPy arrays) for anything else.

It is saved as one ``.npz`` that plain NumPy reads without pickle::

    z = np.load("set.npz")
    z["images"], z["labels"], z["classes"], json.loads(str(z["meta"]))

(the fitted transform's arrays are stored as ``transform.<name>`` entries, described
by ``meta["transform"]``). Writes are atomic (a temporary file in the same directory,
flushed, then renamed over the destination), so an interrupted save never leaves a
half-written file, and an existing file is only replaced when ``overwrite=True``.

Files of format 1 (images in pixel space, the exact model-space images of KIP/MTT in
``arrays['model_images']``, no fitted transform) still load: as sets in pixel space
(``transform=None``; an evaluator applies its own data's preprocessing), with
``label_kind`` read from the method (``datm`` or soft labels: logits; other (N, C)
labels: regression) and ``num_classes`` from the dataset's class list.

Example:
    >>> import numpy as np, tempfile, os
    >>> ds = DistilledSet(np.zeros((2, 8, 8, 1), np.float32), np.array([0, 1]),
    ...                   label_kind="class", num_classes=10, source={"method": "random"})
    >>> path = ds.save(os.path.join(tempfile.mkdtemp(), "set.npz"))
    >>> back = DistilledSet.load(path)
    >>> back.label_kind, back.num_classes, back.classes.tolist()
    ('class', 10, [0, 1])
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

from kipnb import preprocess

__all__ = ["FORMAT_VERSION", "LABEL_KINDS", "DistilledSet", "atomic_write_bytes", "jsonable"]

FORMAT_VERSION = 2
LABEL_KINDS = ("class", "regression", "logits")
_RESERVED = {"images", "labels", "meta", "classes"}
_TRANSFORM_PREFIX = "transform."


def atomic_write_bytes(path: str | os.PathLike, writer, overwrite: bool = True) -> Path:
    """Write a file atomically: ``writer(fileobj)`` fills a temp file that is then renamed.

    The temp file lives in the destination directory (so the rename is atomic) and is
    removed if ``writer`` raises; the destination is untouched until the rename.

    Args:
        path: the destination.
        writer: a function writing the content to a binary file object.
        overwrite: replace an existing ``path`` (else ``FileExistsError``).

    Returns:
        The destination ``Path``.
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


def jsonable(obj: Any) -> Any:
    """Make configs JSON-able: dataclasses, numpy scalars and arrays, tuples, paths.

    Example:
        >>> jsonable({"a": (1, 2), "b": np.float32(0.5)})
        {'a': [1, 2], 'b': 0.5}
    """
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return repr(obj)


def _version() -> str:
    import kipnb

    return kipnb.__version__


@dataclass(frozen=True, eq=False)
class DistilledSet:
    """A distilled dataset: model-space images, labels that say what they are, provenance.

    Args:
        images: (N, H, W, C) images in the space the learner consumed.
        labels: (N,) integer classes (``label_kind='class'``) or (N, C) label vectors.
        label_kind: ``'class'``, ``'regression'`` or ``'logits'`` (module docstring).
        num_classes: C; required for ``'class'`` labels, else ``labels.shape[1]``.
        classes: (N,) the class each image was made for; default: the hard labels.
        transform: the fitted :mod:`kipnb.preprocess` transform from pixels to the
            images' space; None: the images are pixels.
        lr: the learned learning rate, or None.
        source: provenance (``method``, ``learner``, ``config``, ``dataset``, ``ipc``,
            ``data_fingerprint``; ``kipnb_version`` is filled in).
        extra: JSON-able extras (final accuracy, steps, ...).
        arrays: further named arrays.

    Example:
        >>> ds = DistilledSet(np.zeros((3, 4, 4, 1)), np.eye(3) - 1 / 3,
        ...                   label_kind="regression", source={"method": "kip", "ipc": 1})
        >>> ds.num_classes, ds.hard_labels.tolist(), ds.method, ds.ipc
        (3, [0, 1, 2], 'kip', 1)
    """

    images: np.ndarray
    labels: np.ndarray
    label_kind: str
    num_classes: int | None = None
    classes: np.ndarray | None = None
    transform: Any = None
    lr: float | None = None
    source: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)

    def __post_init__(self):
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C); got shape {images.shape}.")
        n = images.shape[0]
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(
                f"label_kind={self.label_kind!r}: use one of {list(LABEL_KINDS)} ('class': "
                "(N,) integer classes; 'regression': KRR targets; 'logits': soft labels)."
            )
        if self.label_kind == "class":
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"label_kind='class' needs (N,) integer labels with N = {n} images; got "
                    f"{labels.dtype} of shape {labels.shape}."
                )
            if self.num_classes is None:
                raise ValueError(
                    "label_kind='class' needs num_classes (it is not guessed from the labels)."
                )
        elif labels.shape[:1] != (n,) or labels.ndim != 2:
            raise ValueError(
                f"label_kind={self.label_kind!r} needs (N, C) label vectors with N = {n} "
                f"images; got shape {labels.shape}."
            )
        c = int(labels.shape[1]) if labels.ndim == 2 else self.num_classes
        if isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 1:
            raise ValueError(f"num_classes must be a positive integer, got {c!r}.")
        if labels.ndim == 2 and self.num_classes is not None and self.num_classes != c:
            raise ValueError(f"num_classes={self.num_classes} but the labels have {c} columns.")
        if self.label_kind == "class" and n and (labels.min() < 0 or labels.max() >= c):
            raise ValueError(f"class labels span [{labels.min()}, {labels.max()}], not [0, {c}).")
        if not np.all(np.isfinite(labels)):
            raise ValueError("labels contain NaN/Inf values.")
        classes = self.classes
        if classes is None:
            classes = labels if labels.ndim == 1 else labels.argmax(axis=1)
        classes = np.asarray(classes)
        if classes.shape != (n,) or not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(
                f"classes must be (N,) integers with N = {n}; got {classes.dtype} of shape "
                f"{classes.shape}."
            )
        if n and (classes.min() < 0 or classes.max() >= c):
            raise ValueError(f"classes span [{classes.min()}, {classes.max()}], not [0, {c}).")
        if self.lr is not None:
            lr = float(self.lr)
            if not (np.isfinite(lr) and lr > 0):
                raise ValueError(f"lr must be a positive finite number or None, got {self.lr!r}.")
            object.__setattr__(self, "lr", lr)
        if self.transform is not None:
            preprocess.state(self.transform)  # fitted kipnb transform, or a clear error
        bad = _RESERVED & set(self.arrays)
        bad |= {k for k in self.arrays if k.startswith(_TRANSFORM_PREFIX)}
        if bad:
            raise ValueError(f"arrays may not use the reserved names {sorted(bad)}.")
        source = {"kipnb_version": _version(), **dict(self.source)}
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "num_classes", int(c))
        object.__setattr__(self, "classes", classes.astype(np.int32))
        object.__setattr__(self, "source", source)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def method(self) -> str | None:
        return self.source.get("method")

    @property
    def dataset(self) -> str | None:
        return self.source.get("dataset")

    @property
    def ipc(self) -> int | None:
        return self.source.get("ipc")

    @property
    def preprocessing(self) -> dict:
        """The recipe of ``transform`` (``{}`` for pixel-space images)."""
        return {} if self.transform is None else self.transform.recipe()

    @property
    def hard_labels(self) -> np.ndarray:
        """Integer classes: the labels, or the argmax of label vectors."""
        return self.labels if self.labels.ndim == 1 else self.labels.argmax(axis=1)

    def to_pixels(self) -> np.ndarray:
        """The images in pixel space (``transform.invert``; a copy when there is none).

        Example:
            >>> DistilledSet(np.ones((1, 2, 2, 1)), np.array([0]), label_kind="class",
            ...              num_classes=2).to_pixels().shape
            (1, 2, 2, 1)
        """
        if self.transform is None:
            return np.array(self.images, np.float32)
        return np.asarray(self.transform.invert(self.images), np.float32)

    def meta(self) -> dict:
        recipe = None
        if self.transform is not None:
            recipe, _ = preprocess.state(self.transform)
        return {
            "format_version": FORMAT_VERSION,
            "label_kind": self.label_kind,
            "num_classes": self.num_classes,
            "lr": self.lr,
            "transform": recipe,
            "source": jsonable(self.source),
            "extra": jsonable(self.extra),
            "arrays": sorted(self.arrays),
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write one ``.npz`` atomically; refuses to replace a file unless ``overwrite``.

        Args:
            path: a ``.npz`` path.
            overwrite: replace an existing file (else ``FileExistsError``, file untouched).

        Returns:
            The path written.
        """
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: a DistilledSet is saved as a .npz file.")
        payload = {
            "images": self.images,
            "labels": self.labels,
            "classes": self.classes,
            "meta": np.asarray(json.dumps(self.meta())),
            **{k: np.asarray(v) for k, v in self.arrays.items()},
        }
        if self.transform is not None:
            _, t_arrays = preprocess.state(self.transform)
            payload.update({_TRANSFORM_PREFIX + k: v for k, v in t_arrays.items()})
        return atomic_write_bytes(path, lambda f: np.savez(f, **payload), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_classes: int | None = None) -> DistilledSet:
        """Read a set written by :meth:`save` (format 2 or 1; no pickle involved).

        Args:
            path: the ``.npz`` file.
            num_classes: only for format-1 files of an unknown dataset with (N,) labels.

        Returns:
            The :class:`DistilledSet`.

        Raises:
            ValueError: the file is not a readable DistilledSet; the message says what
                is wrong (missing entries, bad metadata, shapes, a newer format).
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"images", "labels", "meta"} - set(z.files)
                if missing:
                    raise _BadFile(f"it lacks {sorted(missing)}")
                try:
                    meta = json.loads(str(z["meta"]))
                except json.JSONDecodeError as e:
                    raise _BadFile(f"its 'meta' entry is not JSON ({e})") from None
                if not isinstance(meta, dict):
                    raise _BadFile("its 'meta' entry is not a JSON object")
                version = meta.get("format_version", 0)
                if not isinstance(version, int) or version < 1:
                    raise _BadFile(f"its format_version is {version!r}")
                if version > FORMAT_VERSION:
                    raise _BadFile(
                        f"it was written by a newer kipnb (format {version}; this kipnb reads "
                        f"up to {FORMAT_VERSION}); upgrade kipnb to read it"
                    )
                names = meta.get("arrays", [])
                absent = [k for k in names if k not in z.files]
                if absent:
                    raise _BadFile(f"its arrays {absent} named in meta are missing")
                arrays = {k: z[k] for k in names}
                images, labels = z["images"], z["labels"]
                classes = z["classes"] if "classes" in z.files else None
                t_arrays = {k[len(_TRANSFORM_PREFIX):]: z[k] for k in z.files
                            if k.startswith(_TRANSFORM_PREFIX)}
        except _BadFile as e:
            raise ValueError(f"{path} is not a valid DistilledSet file: {e}.") from None
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(
                f"{path} could not be read as a DistilledSet .npz (truncated or not an .npz?): "
                f"{e}"
            ) from None
        try:
            if version == 1:
                return _from_format1(meta, images, labels, arrays, num_classes)
            for key in ("label_kind", "num_classes", "source"):
                if key not in meta:
                    raise _BadFile(f"its meta lacks {key!r}")
            if classes is None:
                raise _BadFile("it lacks 'classes'")
            transform = None
            if meta.get("transform") is not None:
                transform = preprocess.from_state(meta["transform"], t_arrays)
            return cls(
                images=images, labels=labels, label_kind=meta["label_kind"],
                num_classes=meta["num_classes"], classes=classes, transform=transform,
                lr=meta.get("lr"), source=meta["source"], extra=meta.get("extra", {}),
                arrays=arrays,
            )
        except (_BadFile, ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a valid DistilledSet file: {e}") from None


class _BadFile(Exception):
    pass


def _from_format1(meta, images, labels, arrays, num_classes) -> DistilledSet:
    """A format-1 set as a pixel-space format-2 set (see the module docstring)."""
    method = meta.get("method")
    extra = dict(meta.get("extra", {}))
    arrays = dict(arrays)
    classes = arrays.pop("classes", None)
    if labels.ndim == 1:
        kind = "class"
        if num_classes is None:
            from kipnb import data

            spec = data.DATASETS.get(meta.get("dataset"))
            if spec is None or not spec.class_names:
                raise _BadFile(
                    f"it is a format-1 file of dataset {meta.get('dataset')!r} with integer "
                    "labels and no class count; pass num_classes= to DistilledSet.load"
                )
            num_classes = len(spec.class_names)
    elif method == "datm" or extra.get("soft_labels"):
        kind = "logits"
    else:
        kind = "regression"
    lr = extra.pop("lr", None)
    if lr is None and "syn_lr" in arrays:
        lr = float(arrays["syn_lr"])
    source = {
        "method": method, "dataset": meta.get("dataset"), "ipc": meta.get("ipc"),
        "config": meta.get("config", {}), "preprocessing": meta.get("preprocessing", {}),
        "format": 1, "kipnb_version": "format 1",
    }
    return DistilledSet(images=images, labels=labels, label_kind=kind, num_classes=num_classes,
                        classes=classes, transform=None, lr=lr, source=source, extra=extra,
                        arrays=arrays)
