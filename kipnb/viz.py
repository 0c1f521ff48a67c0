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
