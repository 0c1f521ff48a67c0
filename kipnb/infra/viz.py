"""Figures: image grids, spectra. Plain matplotlib, so they render headless (MPLBACKEND=agg)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["LivePlot", "for_display", "image_grid"]


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


def _hard(labels, n: int, what: str) -> np.ndarray:
    """Integer classes from classes (N,) or scores (N, C) (their argmax)."""
    y = np.asarray(labels)
    if y.ndim == 2:
        y = np.argmax(y, axis=1)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(
            f"{what} must be classes (N,) or scores (N, C) for the N={n} images; got shape "
            f"{np.shape(labels)}."
        )
    if y.size and (y.min() < 0 or not np.all(y == np.round(y))):
        raise ValueError(f"{what} must be non-negative integer classes, got {y[:5]} ...")
    return y.astype(int)


def _name(c: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return str(class_names[c])
    return str(c)


def image_grid(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    ncols: int | None = None,
    mode: str = "clip",
    title: str | None = None,
    size: float = 1.1,
    axes=None,
    classes: np.ndarray | None = None,
):
    """Show images (N, H, W, C) in a grid, one column per class; returns the figure.

    Each image is placed and titled by its class: ``classes`` when given (for a distilled
    set: the class each image was created for), else the class of ``labels``. ``labels``
    may be classes ``(N,)`` or scores ``(N, C)`` -- learned, solved or soft labels, whose
    argmax is used. When both are given and an image's label argmax differs from its
    class, its title adds the label's class as ``→ name`` (a learned label that drifted).

    Any labels fit: with one column per class the grid has as many rows as the largest
    class, and smaller classes leave blanks. With ``axes`` (a 1-D or 2-D array of axes,
    for instance some rows of a larger figure) the layout takes the axes' shape: the first
    images of each class that fit are shown, the rest are left out, spare axes stay blank.

    Args:
        images: (N, H, W, C) images, mapped to [0, 1] by ``mode`` (see :func:`for_display`).
        labels: optional classes (N,) or label scores (N, C).
        class_names: optional names indexed by class.
        ncols: columns of a new figure; ``None``: one per class present (10 unlabelled).
            Ignored when ``axes`` is given.
        mode: ``'clip'`` or ``'minmax'``.
        title: optional figure title.
        size: inches per image.
        axes: optional matplotlib axes to draw into instead of a new figure.
        classes: optional (N,) class each image was created for.

    Returns:
        The matplotlib figure.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).random((5, 8, 8, 1))
        >>> soft = np.eye(3)[[0, 0, 1, 2, 1]]  # the last image's label drifted to class 1
        >>> fig = image_grid(x, soft, ["a", "b", "c"], classes=[0, 0, 1, 2, 2])
        >>> [ax.get_title() for ax in fig.axes]
        ['a', 'b', 'c', 'a', '', 'c → b']
    """
    x = for_display(images, mode)
    n = x.shape[0]
    lab = _hard(labels, n, "labels") if labels is not None else None
    cls = _hard(classes, n, "classes") if classes is not None else lab
    if axes is not None:
        grid = np.asarray(axes, dtype=object)
        grid = grid.reshape(1, -1) if grid.ndim <= 1 else grid.reshape(grid.shape[0], -1)
        fig = grid.flat[0].figure
        nrows, ncols = grid.shape
    elif ncols is None:
        ncols = len(np.unique(cls)) if cls is not None else 10
    ncols = max(1, int(ncols))
    present = np.unique(cls) if cls is not None else None
    if present is not None and len(present) <= ncols:
        # image j of class c goes to row j of c's column: the class index itself when it
        # fits (so a missing class leaves its column blank), else c's rank among the classes
        rank = {int(c): k for k, c in enumerate(present)}
        col = {c: (c if present.max() < ncols else r) for c, r in rank.items()}
        per = {c: np.flatnonzero(cls == c) for c in rank}
        if axes is None:
            nrows = max(len(p) for p in per.values()) if per else 1
        slots = np.full((nrows, ncols), -1)
        for c, idx in per.items():
            idx = idx[:nrows]
            slots[np.arange(len(idx)), col[c]] = idx
    else:  # unlabelled, or more classes than columns: row-major
        if axes is None:
            nrows = max(1, -(-n // ncols))
        flat = np.full(nrows * ncols, -1)
        k = min(n, flat.size)
        flat[:k] = np.arange(k)
        slots = flat.reshape(nrows, ncols)
    if axes is None:
        fig, grid = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4),
                                 squeeze=False)
    for ax, i in zip(grid.ravel(), slots.ravel(), strict=True):
        ax.axis("off")
        if i < 0:
            continue
        img = x[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        if cls is not None:
            name = _name(cls[i], class_names)
            if classes is not None and lab is not None and lab[i] != cls[i]:
                name += f" → {_name(lab[i], class_names)}"
            ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class LivePlot:
    """A live loss / accuracy figure for training loops: pass it as ``callback=``.

    Called with dicts like ``{"step": 10, "loss": 0.01, "test_acc": 0.8}`` (as
    :func:`kipnb.kip.run` sends them), it records every metric it is given and redraws
    every ``every`` steps and on the last one (``info["last"]``). In Jupyter the figure
    updates in place (one output, via an IPython display handle); without IPython it
    only records, and :meth:`figure` draws on demand. ``history`` holds what it saw.
    """

    def __init__(self, every: int = 25, metrics: Sequence[str] = ("loss", "test_acc"),
                 title: str | None = None, logy: Sequence[str] = ("loss",)):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.metrics, self.title, self.logy = every, tuple(metrics), title, set(logy)
        self.history: dict[str, tuple[list, list]] = {m: ([], []) for m in self.metrics}
        self._fig = None
        self._handle = None

    def __call__(self, info: dict) -> None:
        step = info.get("step", 0)
        for m in self.metrics:
            if info.get(m) is not None:
                xs, ys = self.history[m]
                xs.append(step)
                ys.append(float(info[m]))
        if step % self.every == 0 or info.get("last"):
            self._show()

    def figure(self):
        """Draw the recorded curves; returns the matplotlib figure."""
        if self._fig is None:
            self._fig, axes = plt.subplots(1, len(self.metrics),
                                           figsize=(4.2 * len(self.metrics), 3.0))
            plt.close(self._fig)  # shown through the display handle, not by pyplot
        axes = np.atleast_1d(self._fig.axes)
        for ax, m in zip(axes, self.metrics, strict=True):
            ax.clear()
            xs, ys = self.history[m]
            ax.plot(xs, ys, ".-" if len(xs) < 50 else "-")
            ax.set_xlabel("step")
            ax.set_title(m)
            if m in self.logy and ys and min(ys) > 0:
                ax.set_yscale("log")
        if self.title:
            self._fig.suptitle(self.title)
        self._fig.tight_layout()
        return self._fig

    def _show(self) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:  # plain Python: record only
            return
        if get_ipython() is None:
            return
        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
