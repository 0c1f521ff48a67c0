"""Figures: image grids, spectra. Plain matplotlib, so they render headless (MPLBACKEND=agg)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["for_display", "image_grid"]


def for_display(images: np.ndarray, mode: str = "clip") -> np.ndarray:
    """Images (N, H, W, C) mapped to [0, 1]: ``'clip'`` or per-image ``'minmax'``."""
    x = np.asarray(images, dtype=np.float32)
    if mode == "clip":
        return np.clip(x, 0.0, 1.0)
    if mode == "minmax":
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        return (x - lo) / np.maximum(hi - lo, 1e-12)
    raise ValueError(f"Unknown display mode {mode!r}: use 'clip' or 'minmax'.")


def image_grid(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    ncols: int | None = None,
    mode: str = "clip",
    title: str | None = None,
    size: float = 1.1,
    axes=None,
):
    """Show images (N, H, W, C) in a grid, labelled by class; returns the figure.

    With class-sorted labels and ``ncols=None``, each column is one class.
    """
    x = for_display(images, mode)
    n = x.shape[0]
    if ncols is None:
        ncols = len(np.unique(labels)) if labels is not None and np.ndim(labels) == 1 else 10
        ncols = max(1, min(ncols, n))
    order = np.arange(n)
    if labels is not None and np.ndim(labels) == 1 and ncols == len(np.unique(labels)):
        # one column per class: image j of class c goes to row j, column c
        per = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        rows = max(len(p) for p in per)
        order = np.full(rows * ncols, -1)
        for c, idx in enumerate(per):
            order[np.arange(len(idx)) * ncols + c] = idx
    nrows = int(np.ceil(len(order) / ncols))
    if axes is None:
        fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4))
    else:
        fig = np.ravel(axes)[0].figure
    axes = np.atleast_1d(axes).ravel()
    slots = np.concatenate([order, -np.ones(len(axes) - len(order), int)])
    for ax, i in zip(axes, slots, strict=True):
        ax.axis("off")
        if i < 0:
            continue
        img = x[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        if labels is not None and np.ndim(labels) == 1:
            name = class_names[labels[i]] if class_names is not None else str(labels[i])
            ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
