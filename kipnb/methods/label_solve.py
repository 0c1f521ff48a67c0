"""Label Solve: the KRR labels of a fixed support set that best fit the real data.

The images of a class-balanced random support set are kept; their labels are replaced
by the ones that minimize KRR's squared loss on (many) real training targets
(:func:`kipnb.krr.label_solve`). The result is a :class:`kipnb.DistilledSet` with
``label_kind='regression'``.

Example:
    >>> from kipnb import kip, label_solve
    >>> d = kip.prepare("digits")
    >>> ds = label_solve.solve(d, ipc=1, n_targets=300)
    >>> ds.label_kind, ds.images.shape, ds.method
    ('regression', (10, 8, 8, 1), 'label_solve')
"""

from __future__ import annotations

import jax
import numpy as np

from kipnb import archs, data, krr
from kipnb.distilled import DistilledSet

__all__ = ["solve"]


def solve(
    d,
    ipc: int,
    *,
    kernel: str = "fc",
    depth: int | None = None,
    get: str = "ntk",
    reg: float = krr.DEFAULT_REG,
    n_targets: int | None = None,
    seed: int = 0,
    indices=None,
) -> DistilledSet:
    """Label Solve on ``ipc`` random real images per class.

    Args:
        d: prepared data (:func:`kipnb.kip.prepare`), model space.
        ipc: support images per class.
        kernel, depth, get: the kernel (:func:`kipnb.archs.kernel`).
        reg: KRR's relative ridge.
        n_targets: random training targets the labels are fitted to (None: all).
        seed: picks the support images (``class_balanced_indices(key(seed), ...)``) and
            the targets.
        indices: the support set's training indices instead of a random pick.

    Returns:
        A :class:`~kipnb.DistilledSet` (model-space images, solved labels, ``source``
        with the kernel, settings and the support indices).
    """
    C = d.num_classes
    if indices is None:
        indices = data.class_balanced_indices(jax.random.key(seed), d.labels_train, ipc, C)
    indices = np.asarray(indices)
    rng = np.random.default_rng(seed)
    n = len(d.x_train)
    tgt = np.arange(n) if n_targets is None or n_targets >= n else rng.permutation(n)[:n_targets]
    kw = {} if depth is None else {"depth": depth}
    kernel_fn = archs.kernel(kernel, num_classes=C, **kw)
    x_s = d.x_train[indices]
    y = krr.label_solve(kernel_fn, x_s, d.x_train[tgt], krr.one_hot_targets(d.labels_train[tgt], C),
                        reg=reg, get=get)
    name = f"{kernel}{depth or ''}-{get}"
    return DistilledSet(
        images=np.asarray(x_s, np.float32), labels=np.asarray(y, np.float32),
        label_kind="regression", num_classes=C, classes=d.labels_train[indices],
        transform=d.transform,
        source={"method": "label_solve", "learner": f"krr {name}", "dataset": d.dataset,
                "ipc": int(ipc), "data_fingerprint": d.fingerprint(),
                "config": {"kernel": kernel, "depth": depth, "get": get, "reg": reg,
                           "n_targets": int(len(tgt)), "seed": seed},
                "indices": indices.tolist()},
    )
