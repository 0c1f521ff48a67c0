"""Atomic checkpoints of pytrees (parameters, optimizer states) in one ``.npz`` file.

Long runs (KIP, expert trajectories, trajectory matching) save their whole state every
few steps with :func:`save` and pick it up again with :func:`load`, so a run that is
killed and restarted resumes where it stopped. A checkpoint holds:

* the leaves of a pytree, as arrays ``leaf_0``, ``leaf_1``, ... (in
  ``jax.tree_util`` order), and
* ``meta``: a JSON document (step, config, history, ...), plus the number of leaves
  and the tree structure as text for checking.

:func:`load` rebuilds the tree on the structure of a *template* (e.g. freshly
initialized parameters and ``optimizer.init(params)``): every leaf's shape and dtype
must match the template's, so a checkpoint from a different configuration is refused
with :class:`CheckpointError` instead of being silently misread.

Writes go through :func:`kipnb.distilled.atomic_write_bytes` (a temporary file in the
same directory, then a rename), so a crash during a save leaves the previous
checkpoint intact. Nothing here ever deletes a checkpoint: an unreadable or mismatched
file is reported, with its path, and left for the user.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kipnb.distilled import atomic_write_bytes, jsonable

__all__ = ["CheckpointError", "check_resumable", "config_diff", "data_fingerprint", "load",
           "resumable_config",
           "read_meta", "save"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, or for another configuration)."""


def save(path: str | os.PathLike, tree: Any, meta: dict | None = None) -> Path:
    """Write ``tree`` (any pytree of arrays) and JSON-able ``meta`` atomically to ``path``.

    Replaces an existing checkpoint at ``path`` (only once the new one is complete).
    """
    path = Path(path)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    payload = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    doc = {"meta": jsonable(meta or {}), "n_leaves": len(leaves), "treedef": str(treedef)}
    payload["meta"] = np.asarray(json.dumps(doc))
    return atomic_write_bytes(path, lambda f: np.savez(f, **payload), overwrite=True)


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` document of a checkpoint, without its arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"]))["meta"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(_unreadable(path, e)) from None


def _unreadable(path: Path, e: Exception) -> str:
    return (
        f"Checkpoint {path} could not be read ({type(e).__name__}: {e}); it may be "
        f"truncated or not a kipnb checkpoint. It was left in place: move it away (or "
        f"use another checkpoint directory) to start the run afresh."
    )


def load(path: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """Read a checkpoint written by :func:`save`: ``(tree, meta)``.

    ``template`` is a pytree with the structure, shapes and dtypes the checkpoint must
    have (its values are not used). Raises :class:`CheckpointError` naming the file if
    it cannot be read or does not match.
    """
    path = Path(path)
    t_leaves, treedef = jax.tree_util.tree_flatten(template)
    try:
        with np.load(path, allow_pickle=False) as z:
            doc = json.loads(str(z["meta"]))
            n = int(doc["n_leaves"])
            leaves = [z[f"leaf_{i}"] for i in range(n)]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(_unreadable(path, e)) from None
    fix = (
        "It was written by a run with a different configuration. Use another checkpoint "
        "directory, or move the file away to start afresh (it was left in place)."
    )
    if n != len(t_leaves):
        raise CheckpointError(
            f"Checkpoint {path} holds {n} arrays but this run's state has "
            f"{len(t_leaves)}. {fix}"
        )
    for i, (got, want) in enumerate(zip(leaves, t_leaves, strict=True)):
        want_shape, want_dtype = np.shape(want), np.asarray(want).dtype
        if got.shape != want_shape or got.dtype != want_dtype:
            raise CheckpointError(
                f"Checkpoint {path}: array {i} is {got.dtype}{list(got.shape)} but this "
                f"run's state needs {want_dtype}{list(want_shape)}. {fix}"
            )
    return jax.tree_util.tree_unflatten(treedef, leaves), doc["meta"]


def config_diff(saved: dict, now: dict, free=(), names=("in the checkpoint", "now")) -> list[str]:
    """``'field: A in the checkpoint, B now'`` for every field (but ``free`` ones) that differs."""
    keys = sorted((set(saved) | set(now)) - set(free))
    return [f"{k}: {saved.get(k)!r} {names[0]}, {now.get(k)!r} {names[1]}"
            for k in keys if saved.get(k) != now.get(k)]


def resumable_config(config) -> dict:
    """``dataclasses.asdict(config)`` as a checkpoint stores it, older checkpoints in mind.

    A field added to a config class after checkpoints were written is named, with its
    default, in the class's ``ADDED_FIELDS`` (a ``ClassVar`` dict). While it keeps that
    default it is left out of the dict, so a checkpoint written before the field existed
    still belongs to the same run and resumes; any other value is kept (and a resume
    from an older checkpoint is refused, naming the field).

    Args:
      config: a config dataclass instance.

    Returns:
      The JSON-able dict to save and compare on resume.

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass(frozen=True)
      ... class Cfg:
      ...     steps: int = 10
      ...     growth: int = 1
      >>> Cfg.ADDED_FIELDS = {"growth": 1}  # in a class body: ADDED_FIELDS: ClassVar[dict]
      >>> resumable_config(Cfg()), resumable_config(Cfg(growth=2))
      ({'steps': 10}, {'steps': 10, 'growth': 2})
    """
    out = dataclasses.asdict(config)
    for name, default in getattr(type(config), "ADDED_FIELDS", {}).items():
        if name in out and out[name] == default:
            del out[name]
    return out


def check_resumable(path, config: dict, data: str, *, what: str, free=(),
                    data_why: str = "the training data differ") -> dict:
    """The meta of checkpoint ``path`` if it belongs to this run, else :class:`CheckpointError`.

    "This run": the same ``config`` (a JSON-able dict) up to the ``free`` fields (those a
    resumed run may change, e.g. the number of steps), and the same ``data`` fingerprint.
    The error names the differing fields; the file is left in place.
    """
    meta = read_meta(path)
    diff = config_diff(meta.get("config", {}), config, free)
    if diff or meta.get("data") != data:
        why = "; ".join(diff) if diff else data_why
        raise CheckpointError(
            f"Checkpoint {path} belongs to another {what} run ({why}). Use another "
            f"checkpoint_dir, or move the file away to start afresh (it was left in place)."
        )
    return meta


def data_fingerprint(x: np.ndarray, labels: np.ndarray) -> str:
    """A short hash of a training set (shape, dtype, every ~n/64-th image, all labels),
    stored in checkpoints and expert files to catch runs resumed on other data."""
    x = np.asarray(x)
    h = hashlib.sha256()
    h.update(str((x.shape, x.dtype.str)).encode())
    h.update(np.ascontiguousarray(x[:: max(1, len(x) // 64)]).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]
