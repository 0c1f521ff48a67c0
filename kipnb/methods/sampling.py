r"""Importance sampling for dataset distillation: initialization and target batches.

After Tukan, Maalouf, Osadchy, "Dataset Distillation Meets Provable Subset Selection"
(2023). Two places where distillation usually samples uniformly get an importance
distribution instead:

1. **Initialization.** The support set starts from real images picked in proportion to
   their *sensitivity* (importance) with respect to a loss, with redundant picks removed.
   The sensitivity of a point ``p`` of a set ``P`` with respect to a loss ``f(p, q)`` over
   all queries ``q`` (models) is ``s(p) = sup_q f(p, q) / sum_{p' in P} f(p', q)``: the
   largest share of the total loss ``p`` can ever carry. Sampling by (an upper bound
   on) ``s`` and reweighting by ``1 / (n p)`` is the classical route to coresets.

   * KRR-based methods (LS, KIP): :func:`krr_sensitivity`, for the kernel-fitting loss.
   * Everything else (trajectory matching, ...): :func:`kmeans_sensitivity`.
   * :func:`sample_init` turns scores into class-balanced picks (without replacement,
     with an optional minimum distance between the picks of a class).

2. **Target batches.** :class:`ImportanceSampler` implements :class:`kipnb.kip.BatchSampler`:
   every ``refresh_every`` steps it computes each training point's loss under the current
   distilled set (KRR from the support set by default, :class:`KRRLoss`; any
   ``loss_fn(support, x_block, y_block)`` works), mixes the normalized losses with the
   uniform distribution, draws the batch from that, and returns importance weights
   ``1 / (N p_i)`` that keep KIP's loss an unbiased estimate of the full-data mean loss.

The {uniform, importance} initialization x {uniform, importance} batches ablation is an
experiment, not library code: notebook 05 loops over its settings (each one a
``kip.run`` or a Label Solve call) and ``benchmarks/importance_ablation.py`` runs that
notebook. This module does not import :mod:`kipnb.kip`: it returns indices, scores and
arrays, and KIP consumes them (``kip.run(initial=..., batch_sampler=...)``).

Choices made here (the paper gives no code, and leaves these open):

* The KRR sensitivity is the *ridge leverage of the augmented row* ``[phi(p), y(p)]`` in
  a Nystrom feature space (details in :func:`krr_sensitivity`); the paper's "kernel
  fitting loss" is taken to be KRR's squared loss over all models in that space.
* k-means sensitivities use the standard bound ``d(p, c)^2 / cost + 1 / |cluster|`` from
  one k-means solution per class.
* "Removing redundant points" is a greedy minimum distance between the picks of a class;
  ``min_dist='auto'`` is the 5 % quantile of within-class distances (:func:`auto_min_dist`).
* Batches are drawn *with* replacement (so the ``1 / (N p)`` weights are exactly unbiased)
  and, by default, stratified by class like KIP's default class-balanced batches.
* The per-point loss for batches is KIP's own loss, ``0.5 mean_c (pred - y)^2``;
  ``KRRLoss(kind='ce')`` gives the cross-entropy of ``softmax(pred / temperature)``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_factor, cho_solve, solve_triangular

from kipnb import archs, data, krr, loop

__all__ = [
    "ImportanceSampler",
    "KRRLoss",
    "auto_min_dist",
    "importance_weights",
    "initial_support",
    "kmeans_sensitivity",
    "krr_sensitivity",
    "sample_init",
    "uniform_init",
]

HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- helpers


def _default_kernel(num_classes: int) -> Callable:
    """The FC-3 NTK of :mod:`kipnb.archs` (cheap: ~50M pairs/s on 28x28 images on a CPU)."""
    return archs.kernel("fc", num_classes=num_classes)  # = kip.kernel_for(KIPConfig(arch="fc"))


def _labels(labels, num_classes: int | None, n: int | None = None, what: str = "x"):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be 1-D integer class indices, got {labels.dtype}"
                         f"{list(labels.shape)}.")
    if n is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries but {what} has {n} rows.")
    if len(labels) == 0:
        raise ValueError("labels is empty.")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in "
                         f"[{labels.min()}, {labels.max()}].")
    return labels, num_classes


def _entropy(key_or_seed) -> list[int]:
    """Seed material for ``numpy.random.default_rng`` from an int seed or a JAX PRNG key."""
    if isinstance(key_or_seed, bool):
        raise TypeError("key_or_seed must be an int seed or a JAX PRNG key, got a bool.")
    if isinstance(key_or_seed, int | np.integer):
        if key_or_seed < 0:
            raise ValueError(f"seed must be >= 0, got {key_or_seed}.")
        return [int(key_or_seed)]
    try:
        if jnp.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key):
            key_or_seed = jax.random.key_data(key_or_seed)
        raw = np.asarray(key_or_seed)
    except (AttributeError, TypeError):
        raise TypeError(f"key_or_seed must be an int seed or a JAX PRNG key, got "
                        f"{type(key_or_seed).__name__}.") from None
    if not np.issubdtype(raw.dtype, np.integer):
        raise TypeError(f"key_or_seed must be an int seed or a JAX PRNG key, got {raw.dtype}.")
    return [int(v) for v in raw.astype(np.uint32).ravel()]


def _flat(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x.reshape(len(x), -1)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pad a block to ``size`` rows by repeating its first row (one compiled shape)."""
    if len(a) == size:
        return a
    return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)])


# -------------------------------------------------------------- KRR sensitivity


@functools.partial(jax.jit, static_argnames=("kernel_fn", "get"))
def _nystrom(kernel_fn, get, x_m, lower, xb):
    """Nystrom features ``phi = k(xb, x_m) L^{-T}`` with ``L L^T = K_mm + lam I``."""
    k_bm = kernel_fn(xb, x_m, get)
    return solve_triangular(lower, k_bm.T, lower=True).T, jnp.all(jnp.isfinite(k_bm))


@jax.jit
def _accumulate(g, b, yy, phi, yb, mask):
    phi = phi * mask[:, None]
    yb = yb * mask[:, None]
    return (g + jnp.matmul(phi.T, phi, precision=HIGHEST),
            b + jnp.matmul(phi.T, yb, precision=HIGHEST),
            yy + jnp.matmul(yb.T, yb, precision=HIGHEST))


@jax.jit
def _score_block(h, w, p_res, phi, yb):
    r = yb - jnp.matmul(phi, w, precision=HIGHEST)
    lev = jnp.sum(phi * cho_solve((h, True), phi.T).T, axis=1)
    res = jnp.sum(jnp.matmul(r, p_res, precision=HIGHEST) * r, axis=1)
    return lev, res, 0.5 * jnp.mean(r**2, axis=1)


def _nystrom_scores(kernel_fn, get, x, y, landmarks, reg, ridge, bs, dtype, progress, desc):
    """(leverage, residual term, loss) of every row of x with Nystrom features on landmarks."""
    n, m, C = len(x), len(landmarks), y.shape[1]
    x_m = jnp.asarray(x[landmarks], dtype)
    lower, _ = cho_factor(krr.regularized(kernel_fn(x_m, x_m, get), reg), lower=True)
    if not np.isfinite(np.asarray(lower)).all():
        raise krr.NumericalError(
            f"The Cholesky factorization of the {m} landmarks' kernel failed; raise reg "
            f"(now {reg:g}) or check the images for NaN/Inf or duplicates."
        )
    g = jnp.zeros((m, m), dtype)
    b = jnp.zeros((m, C), dtype)
    yy = jnp.zeros((C, C), dtype)
    blocks = list(krr.block_slices(n, bs))
    feats = []  # n x m features, kept for the second pass (no second kernel evaluation)
    for start, stop in loop.progress(blocks, total=len(blocks), desc=desc, enabled=progress):
        phi, finite = _nystrom(kernel_fn, get, x_m, lower, jnp.asarray(_pad(x[start:stop], bs),
                                                                         dtype))
        if not bool(finite):
            raise krr.NumericalError(f"kernel_fn gave NaN/Inf for images {start}:{stop}.")
        yb = jnp.asarray(_pad(y[start:stop], bs), dtype)
        mask = jnp.asarray((np.arange(bs) < stop - start).astype(np.float32), dtype)
        g, b, yy = _accumulate(g, b, yy, phi, yb, mask)
        feats.append(phi)
    g64, b64, yy64 = (np.asarray(a, np.float64) for a in (g, b, yy))
    mu = ridge * np.trace(g64) / m
    h64 = np.linalg.cholesky(g64 + mu * np.eye(m))
    w64 = np.linalg.solve(h64.T, np.linalg.solve(h64, b64))
    rtr = yy64 - w64.T @ b64 - b64.T @ w64 + w64.T @ g64 @ w64  # R^T R, R = Y - Phi W
    p_res = np.linalg.pinv((rtr + rtr.T) / 2, rcond=1e-6, hermitian=True)
    h, w, p_res = (jnp.asarray(a, dtype) for a in (h64, w64, p_res))
    lev, res, loss = (np.empty(n) for _ in range(3))
    for (start, stop), phi in zip(blocks, feats, strict=True):
        yb = jnp.asarray(_pad(y[start:stop], bs), dtype)
        for arr, o in zip((lev, res, loss), _score_block(h, w, p_res, phi, yb), strict=True):
            arr[start:stop] = np.asarray(o, np.float64)[: stop - start]
    return lev, res, loss


def krr_sensitivity(
    x,
    labels,
    num_classes: int | None = None,
    *,
    kernel_fn: Callable | None = None,
    get: str = "ntk",
    landmarks_per_class: int = 50,
    reg: float = 1e-4,
    ridge: float = 1e-3,
    block_size: int = 2000,
    seed: int = 0,
    return_parts: bool = False,
    progress: bool = False,
):
    r"""Sensitivity of every point for the KRR (kernel-fitting) loss; ``(n,)`` float64.

    The loss: KRR's squared loss ``f(p, W) = ||phi(p) W - y(p)||^2`` of a point ``p``
    (image ``x``, centered one-hot target ``y``) under a linear model ``W`` on kernel
    features ``phi``. Its sensitivity, ``sup_W f(p, W) / sum_p' f(p', W)``, is at most
    the *leverage score* of the augmented row ``z(p) = [phi(p), y(p)]`` (the sup over all
    ``V`` of ``||z(p) V||^2 / ||Z V||^2``, with ``V = [W; -I]``)::

        s(p) = z^T (Z^T Z)^+ z = tau(p) + r(p)^T (R^T R)^+ r(p)

    where ``tau(p) = phi^T (Phi^T Phi + mu I)^{-1} phi`` is the (ridge) leverage of the
    image (high for images unlike the rest of the data, low for near-duplicates) and
    ``r(p) = y - phi W*`` is its residual under the best KRR fit ``W*`` (high for images
    the fit explains badly: hard, ambiguous or mislabelled ones). The leverages sum to
    the effective dimension (at most ``m``), the residual terms to ``rank(R) <= C - 1``
    (per fit; about that after the cross-fitting below).

    Features: Nystrom with ``landmarks_per_class`` landmarks per class drawn uniformly
    with ``seed``: ``phi(x) = k(x, X_m) L^{-T}``, ``L L^T = K_mm + reg * tr(K_mm)/m * I``,
    so ``phi(x) phi(x')^T`` approximates ``k(x, x')``. Blocks of ``block_size`` images
    accumulate ``Phi^T Phi``, ``Phi^T Y`` and ``Y^T Y``; ``W* = (Phi^T Phi + mu I)^{-1}
    Phi^T Y`` with ``mu = ridge * tr(Phi^T Phi) / m``, and ``R^T R`` follows from them.

    **Cross-fitting.** A landmark is represented exactly by its own features, which gives
    it a direction of its own and inflates its leverage (about 15x on Fashion-MNIST with
    the FC NTK). So two disjoint landmark sets A and B are drawn, and every point is
    scored with features of a set it is not in (landmarks of A with B, all others with
    A). Cost: two fits, ``2 n m`` kernel entries; 60000 Fashion-MNIST images with 500
    landmarks per set take about 10-20 s on a 2-core CPU with the FC NTK (memory: the
    ``n x m`` features of one set at a time).

    Args:
      x: ``(n, ...)`` images in model space (NumPy; blocks move to the device).
      labels: ``(n,)`` integer classes.
      num_classes: C (default: ``max(labels) + 1``).
      kernel_fn: ``kernel_fn(x1, x2, get)``; default the FC-3 NTK of :mod:`kipnb.archs`
        (use KIP's kernel, ``kip.kernel_for(config)``, to match a KIP run).
      get: ``'ntk'`` or ``'nngp'``.
      landmarks_per_class: Nystrom landmarks per class and set (at most half a class).
      reg: relative ridge of ``K_mm`` (keeps ``L^{-1}`` well conditioned in float32).
      ridge: relative ridge ``mu`` of the leverage scores and the fit.
      block_size: images per block.
      seed: picks the landmarks.
      return_parts: return a dict with ``sensitivity``, ``leverage`` (``tau``),
        ``residual`` (the residual term), ``loss`` (``0.5 mean_c r^2``, KIP's per-point
        loss under ``W*``) and ``landmarks`` (``(2, m)``: sets A and B) instead.
      progress: tqdm bars over the blocks.
    """
    n = len(x)
    labels, C = _labels(labels, num_classes, n)
    kernel_fn = _default_kernel(C) if kernel_fn is None else kernel_fn
    if get not in ("ntk", "nngp"):
        raise ValueError(f"get must be 'ntk' or 'nngp', got {get!r}.")
    if landmarks_per_class < 1 or block_size < 1:
        raise ValueError("landmarks_per_class and block_size must be positive.")
    rng = np.random.default_rng([seed, 0x1A4D])
    sets = ([], [])
    for c in range(C):
        idx = np.flatnonzero(labels == c)
        k = min(landmarks_per_class, len(idx) // 2)
        pick = rng.choice(idx, 2 * k, replace=False)
        sets[0].append(np.sort(pick[:k]))
        sets[1].append(np.sort(pick[k:]))
    landmarks = np.stack([np.concatenate(s) for s in sets])
    if landmarks.shape[1] == 0:
        raise ValueError("Too few points for landmarks: every class has fewer than 2 points.")
    x = np.asarray(x)
    dtype = jnp.float64 if x.dtype == np.float64 else jnp.float32
    y = krr.one_hot(labels, C, True, np.float32)
    bs = min(block_size, n)
    parts = [_nystrom_scores(kernel_fn, get, x, y, landmarks[j], reg, ridge, bs, dtype,
                             progress, f"sensitivity ({'AB'[j]})") for j in (0, 1)]
    in_a = np.zeros(n, bool)
    in_a[landmarks[0]] = True
    lev, res, loss = (np.where(in_a, b_, a_) for a_, b_ in zip(parts[0], parts[1], strict=True))
    s = np.maximum(lev, 0.0) + np.maximum(res, 0.0)
    if not np.isfinite(s).all():
        raise krr.NumericalError("KRR sensitivities came out NaN/Inf; raise reg or ridge.")
    if return_parts:
        return {"sensitivity": s, "leverage": lev, "residual": res, "loss": loss,
                "landmarks": landmarks}
    return s


# ------------------------------------------------------------ k-means sensitivity


def kmeans_sensitivity(
    x,
    labels,
    num_classes: int | None = None,
    *,
    k: int = 10,
    seed: int = 0,
    max_iter: int = 100,
    fit_size: int | None = 2000,
    return_parts: bool = False,
):
    r"""Per-class k-means sensitivity of every point; ``(n,)`` float64.

    For each class, one k-means solution (scikit-learn ``KMeans``, k-means++ start,
    ``n_init=1``, ``random_state = seed + class``, fitted on at most ``fit_size`` random
    images of the class to bound the cost) on the flattened images gives centers ``c_j``;
    every image of the class joins its nearest center's cluster ``P_j``. Then, with
    ``cost = sum_p d(p, c(p))^2`` over the class,

        s(p) = d(p, c(p))^2 / cost + 1 / |P_{j(p)}|

    the standard upper bound (up to constant factors, which do not change sampling
    much) on the sensitivity of ``p`` for the k-means loss of its class: a point far
    from its center, or in a small cluster, can carry a large share of the cost of some
    set of k centers. Within a class the first term sums to 1 and the second to the
    number of non-empty clusters, so every class's scores sum to ``1 + k`` (``k`` is
    lowered to the class size for tiny classes; a class whose points all coincide gets
    ``1 / |P_j|`` only, summing to ``k``).

    ``return_parts`` also returns ``distance2``, ``cluster`` (cluster index within the
    class) and ``cluster_size``.
    """
    from sklearn.cluster import KMeans

    n = len(x)
    labels, C = _labels(labels, num_classes, n)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    xf = _flat(x)
    s = np.zeros(n)
    d2 = np.zeros(n)
    cluster = np.full(n, -1)
    size = np.zeros(n)
    for c in range(C):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        kc = min(int(k), len(idx))
        km = KMeans(n_clusters=kc, n_init=1, max_iter=max_iter, random_state=seed + c)
        fit = idx
        if fit_size is not None and len(idx) > fit_size:
            fit = np.random.default_rng([seed, c, 0xC1]).choice(idx, fit_size, replace=False)
        km.fit(xf[fit])
        centers = km.cluster_centers_.astype(np.float32)
        dist2 = (np.sum(xf[idx] ** 2, 1)[:, None] - 2 * xf[idx] @ centers.T
                 + np.sum(centers**2, 1)[None, :]).astype(np.float64)
        assign = np.argmin(dist2, axis=1)
        dist2 = np.maximum(dist2[np.arange(len(idx)), assign], 0.0)
        counts = np.bincount(assign, minlength=kc)
        cost = dist2.sum()
        s[idx] = (dist2 / cost if cost > 0 else 0.0) + 1.0 / counts[assign]
        d2[idx], cluster[idx], size[idx] = dist2, assign, counts[assign]
    if return_parts:
        return {"sensitivity": s, "distance2": d2, "cluster": cluster, "cluster_size": size}
    return s


# ------------------------------------------------------------------ initialization


def auto_min_dist(x, labels, num_classes: int | None = None, *, quantile: float = 0.05,
                  pairs: int = 2000) -> np.ndarray:
    """Per-class redundancy thresholds: a low quantile of within-class distances.

    For every class, the ``quantile`` (default 5 %) of the Euclidean distances between
    ``pairs`` random pairs of its images (flattened, model space; pairs drawn with a
    fixed generator, so the thresholds depend on the data only). Two picks closer than
    that are nearer than 95 % of random pairs of the class: near-duplicates that would
    waste a support slot. Returns ``(C,)`` distances.
    """
    n = len(x)
    labels, C = _labels(labels, num_classes, n)
    if not 0 <= quantile < 1:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}.")
    xf = _flat(x)
    out = np.zeros(C)
    for c in range(C):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        rng = np.random.default_rng([0xD15, c])
        a, b = rng.integers(0, len(idx), (2, pairs))
        keep = a != b
        d = np.linalg.norm(xf[idx[a[keep]]] - xf[idx[b[keep]]], axis=1)
        out[c] = np.quantile(d, quantile) if len(d) else 0.0
    return out


def sample_init(
    key_or_seed,
    scores,
    labels,
    ipc: int,
    num_classes: int | None = None,
    min_dist: float | str | Sequence[float] | None = None,
    x=None,
) -> np.ndarray:
    """Class-balanced picks, without replacement, with probability proportional to ``scores``.

    For every class, the points are put in the order of successive sampling without
    replacement with probabilities proportional to their scores (Efraimidis-Spirakis:
    sort by ``log(u) / score``, ``u ~ U(0, 1)``; the same law as drawing one point at a
    time and renormalizing), then taken greedily in that order, skipping a point that
    lies closer than ``min_dist`` (Euclidean, flattened ``x``) to a point already taken
    from its class: the redundancy filter. Points with score 0 are never picked.

    Args:
      key_or_seed: an int seed or a JAX PRNG key; the picks are a function of it (and the
        inputs) only. Each class uses its own generator ``default_rng([seed..., class])``.
      scores: ``(n,)`` finite, non-negative importances (e.g. :func:`krr_sensitivity`).
        Uniform scores give a uniform class-balanced sample.
      labels: ``(n,)`` integer classes.
      ipc: picks per class.
      num_classes: C (default ``max(labels) + 1``).
      min_dist: None (no filter), a distance, one distance per class, or ``'auto'``
        (:func:`auto_min_dist`: the 5 % quantile of within-class distances). Needs ``x``.
      x: ``(n, ...)`` the images the distances are measured on (model space).

    Returns:
      ``(C * ipc,)`` indices: all of class 0 (sorted), then class 1, ... like
      :func:`kipnb.data.class_balanced_indices`.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per point), got shape {scores.shape}.")
    labels, C = _labels(labels, num_classes, len(scores), "scores")
    bad_nan, bad_neg = ~np.isfinite(scores), np.isfinite(scores) & (scores < 0)
    if bad_nan.any() or bad_neg.any():
        first = int(np.flatnonzero(bad_nan | bad_neg)[0])
        raise ValueError(
            f"scores must be finite and >= 0: {int(bad_nan.sum())} NaN/Inf and "
            f"{int(bad_neg.sum())} negative entries (first at index {first}: "
            f"{scores[first]})."
        )
    if isinstance(ipc, bool) or not isinstance(ipc, int | np.integer) or ipc < 1:
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}.")
    thresholds = np.zeros(C)
    xf = None
    if min_dist is not None:
        if x is None:
            raise ValueError("min_dist needs the images: pass x=(n, ...) model-space images.")
        if len(x) != len(scores):
            raise ValueError(f"x has {len(x)} rows but scores has {len(scores)}.")
        xf = _flat(x)
        if isinstance(min_dist, str):
            if min_dist != "auto":
                raise ValueError(f"min_dist must be a number, per-class numbers, 'auto' or "
                                 f"None, got {min_dist!r}.")
            thresholds = auto_min_dist(x, labels, C)
        else:
            thresholds = np.broadcast_to(np.asarray(min_dist, np.float64), (C,)).copy()
            if not (np.isfinite(thresholds).all() and (thresholds >= 0).all()):
                raise ValueError(f"min_dist must be finite and >= 0, got {min_dist!r}.")
    entropy = _entropy(key_or_seed)
    out = []
    for c in range(C):
        idx = np.flatnonzero(labels == c)
        s = scores[idx]
        positive = int((s > 0).sum())
        if ipc > positive:
            why = (f"it has only {positive} points" if positive == len(idx) else
                   f"it has only {positive} points with a positive score ({len(idx)} in all)")
            raise ValueError(
                f"Cannot pick {ipc} points of class {c}: {why}. Use ipc <= {positive}."
            )
        rng = np.random.default_rng([*entropy, c])
        u = rng.random(len(idx))
        with np.errstate(divide="ignore"):
            key = np.where(s > 0, np.log(u) / np.where(s > 0, s, 1.0), -np.inf)
        order = idx[np.argsort(-key, kind="stable")][:positive]
        if xf is None or thresholds[c] == 0:
            out.append(np.sort(order[:ipc]))
            continue
        taken = [order[0]]
        for i in order[1:]:
            if len(taken) == ipc:
                break
            if np.min(np.linalg.norm(xf[taken] - xf[i], axis=1)) >= thresholds[c]:
                taken.append(i)
        if len(taken) < ipc:
            raise ValueError(
                f"Cannot pick {ipc} points of class {c} at least min_dist={thresholds[c]:.4g} "
                f"apart: found only {len(taken)}. Lower min_dist (or ipc <= {len(taken)})."
            )
        out.append(np.sort(np.asarray(taken)))
    return np.concatenate(out).astype(np.int64)


def uniform_init(seed: int, labels, ipc: int, num_classes: int | None = None) -> np.ndarray:
    """KIP's own uniform class-balanced picks for ``seed`` (``kip.init_support``'s)."""
    labels, C = _labels(labels, num_classes)
    return data.class_balanced_indices(jax.random.key(seed), labels, ipc, C)


def initial_support(d, indices, dtype=jnp.float32) -> dict:
    """``dict(images, labels)`` for ``kip.run(initial=...)``: those training images,
    centered one-hot labels."""
    idx = np.asarray(indices)
    return {"images": jnp.asarray(d.x_train[idx], dtype),
            "labels": krr.one_hot_targets(d.labels_train[idx], d.num_classes, dtype=dtype)}


# ---------------------------------------------------------------- batch sampling


@functools.partial(jax.jit, static_argnames=("kernel_fn", "get", "kind"))
def _krr_point_loss(kernel_fn, get, kind, x_s, alpha, xb, yb, temperature):
    pred = jnp.matmul(kernel_fn(xb, x_s, get), alpha, precision=HIGHEST)
    if kind == "mse":
        return 0.5 * jnp.mean((pred - yb) ** 2, axis=1)
    logp = jax.nn.log_softmax(pred / temperature, axis=1)
    return -jnp.take_along_axis(logp, jnp.argmax(yb, axis=1)[:, None], axis=1)[:, 0]


class KRRLoss:
    """Per-point loss of KRR from the support set: the default ``loss_fn`` of the sampler.

    ``KRRLoss(kernel_fn)(support, x_block, y_block) -> (n,)`` with ``support =
    dict(images, labels)`` (model space, as :func:`kipnb.kip.run` passes it),
    ``pred = k(x_block, X_s) (K_ss + reg * tr(K_ss)/n_s I)^{-1} Y_s`` and

    * ``kind='mse'`` (default): KIP's own loss, ``0.5 * mean_c (pred - y)^2``;
    * ``kind='ce'``: cross-entropy of ``softmax(pred / temperature)`` at the true class
      (KRR outputs live on the scale of centered one-hot targets, about [-0.1, 0.9],
      hence a small temperature).

    The support system is factorized once per support dict (the sampler passes the same
    dict object for all the blocks of one refresh) and cached.
    """

    def __init__(self, kernel_fn: Callable, get: str = "ntk", reg: float = krr.DEFAULT_REG,
                 kind: str = "mse", temperature: float = 0.1):
        if kind not in ("mse", "ce"):
            raise ValueError(f"kind must be 'mse' or 'ce', got {kind!r}.")
        if get not in ("ntk", "nngp"):
            raise ValueError(f"get must be 'ntk' or 'nngp', got {get!r}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.kernel_fn, self.get, self.reg = kernel_fn, get, reg
        self.kind, self.temperature = kind, float(temperature)
        self._cache: tuple[Any, Any, Any] | None = None

    def __call__(self, support: dict, x_block, y_block) -> np.ndarray:
        if self._cache is None or self._cache[0] is not support:
            x_s = jnp.asarray(support["images"])
            k_ss = self.kernel_fn(x_s, x_s, self.get)
            alpha = krr.krr_fit(k_ss, jnp.asarray(support["labels"], k_ss.dtype), self.reg)
            self._cache = (support, x_s, alpha)
        _, x_s, alpha = self._cache
        out = _krr_point_loss(self.kernel_fn, self.get, self.kind, x_s, alpha,
                              jnp.asarray(x_block, x_s.dtype), jnp.asarray(y_block, x_s.dtype),
                              self.temperature)
        return np.asarray(out, np.float64)


def importance_weights(probs, indices) -> np.ndarray:
    """Unbiased importance weights ``w_b = 1 / (N p_{i_b})`` of a batch drawn from ``probs``.

    For draws ``i_b ~ p`` (with replacement), ``E[mean_b w_b l_{i_b}] = (1/N) sum_i l_i``:
    the weighted batch loss is an unbiased estimate of the full-data mean loss. These are
    the weights :meth:`ImportanceSampler.sample` returns (not normalised).

    Args:
      probs: ``(N,)`` sampling probabilities of the training points (positive, sum 1).
      indices: ``(B,)`` the drawn points.

    Returns:
      ``(B,)`` float64 weights.

    Example:
      >>> importance_weights(np.array([0.5, 0.25, 0.25]), np.array([0, 1]))
      array([0.66666667, 1.33333333])
    """
    probs = np.asarray(probs, np.float64)
    return 1.0 / (len(probs) * probs[np.asarray(indices)])


class ImportanceSampler:
    r"""Target batches drawn by importance: a :class:`kipnb.kip.BatchSampler`.

    Every ``refresh_every`` steps (at steps 0, r, 2r, ...) the sampler computes the loss
    ``l_i`` of every training point (or of a random pool of ``pool_size`` points, the
    rest getting their class's mean pool loss) under the *current* support set, with
    ``loss_fn(support, x_block, y_block)`` over blocks of ``block_size`` rows, and sets

        p_i = (1 - mix) * l_i / sum_j l_j + mix / N                 (stratify=False)
        p_i = [(1 - mix) * l_i / sum_{j in c} l_j + mix / N_c] / C  (stratify=True)

    so no point has probability 0 (``p_i >= mix / N``, resp. ``mix / (C N_c)``). With
    ``stratify=True`` (default, like KIP's class-balanced batches) each step draws
    ``batch_size // C`` points of every class, from that class's distribution.

    Each step draws the batch **with replacement** from ``default_rng([seed, step, 0])``
    and returns weights ``w_i = 1 / (N p_i)`` (not normalized), for which
    ``E[mean_b w_b l_b] = (1/N) sum_i l_i`` exactly: KIP's weighted batch loss stays an
    unbiased estimate of the full-data mean loss, whatever ``p`` is (as long as it is
    positive). ``weighted=False`` returns ``None`` instead (a biased, hard-point-focused
    objective).

    Randomness depends on ``(seed, step)`` only (the pool: ``default_rng([seed, step,
    1])``). :meth:`state` holds the current probabilities and the step they were
    computed at; KIP saves it in its checkpoints and a resumed run :meth:`restore` s it,
    so it continues exactly like an uninterrupted one.

    Args:
      x, labels: the training images (model space, as KIP sees them) and classes.
      num_classes: C.
      batch_size: targets per step (KIP's ``target_batch_size``).
      loss_fn: ``loss_fn(support, x_block, y_block) -> (n,)`` non-negative losses, with
        ``y_block`` centered one-hot targets ``(n, C)``; blocks are padded to
        ``block_size`` rows (repeating their first row) and the padding is dropped.
        Default: :class:`KRRLoss` with ``kernel_fn`` (default FC-3 NTK), ``get``, ``reg``.
      refresh_every: steps between loss refreshes.
      pool_size: points whose loss is computed per refresh (None: all).
      mix: weight of the uniform distribution, in (0, 1].
      stratify: class-balanced batches (``batch_size // C`` per class).
      weighted: return the importance weights (else None).
      seed: the random stream.
      block_size: rows per ``loss_fn`` call.
    """

    def __init__(
        self,
        x,
        labels,
        num_classes: int | None = None,
        batch_size: int = 5000,
        *,
        loss_fn: Callable | None = None,
        kernel_fn: Callable | None = None,
        get: str = "ntk",
        reg: float = krr.DEFAULT_REG,
        refresh_every: int = 20,
        pool_size: int | None = None,
        mix: float = 0.2,
        stratify: bool = True,
        weighted: bool = True,
        seed: int = 0,
        block_size: int = 2000,
    ):
        self.x = np.asarray(x)
        self.labels, self.num_classes = _labels(labels, num_classes, len(self.x))
        C, N = self.num_classes, len(self.x)
        for name, v in (("batch_size", batch_size), ("refresh_every", refresh_every),
                        ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if not 0 < mix <= 1:
            raise ValueError(f"mix must be in (0, 1] so that no point has probability 0, "
                             f"got {mix}.")
        if pool_size is not None and not 1 <= pool_size:
            raise ValueError(f"pool_size must be positive or None, got {pool_size}.")
        self.by_class = [np.flatnonzero(self.labels == c) for c in range(C)]
        if stratify:
            empty = [c for c in range(C) if len(self.by_class[c]) == 0]
            if empty:
                raise ValueError(f"stratify=True needs points of every class; class {empty[0]} "
                                 "has none. Use stratify=False.")
            if batch_size < C:
                raise ValueError(f"stratify=True draws batch_size // C per class: batch_size "
                                 f"{batch_size} < C = {C}. Raise it or use stratify=False.")
        self.batch_size, self.refresh_every = int(batch_size), int(refresh_every)
        self.pool_size = None if pool_size is None or pool_size >= N else int(pool_size)
        self.mix, self.stratify, self.weighted = float(mix), bool(stratify), bool(weighted)
        self.seed, self.block_size = int(seed), int(block_size)
        if loss_fn is None:
            loss_fn = KRRLoss(_default_kernel(C) if kernel_fn is None else kernel_fn, get, reg)
        self.loss_fn = loss_fn
        self.y = krr.one_hot(self.labels, C, True, np.float32)
        self._probs = self._mix(np.ones(N))
        self._step = -1
        self.last_losses: np.ndarray | None = None  # diagnostics of the latest refresh
        self.refresh_seconds = 0.0

    @classmethod
    def for_kip(cls, config, d, **kw) -> ImportanceSampler:
        """A sampler for a KIP run: its kernel, ``get``, ``reg``, batch size and seed."""
        kw.setdefault("batch_size", config.target_batch_size)
        kw.setdefault("seed", config.seed)
        if "loss_fn" not in kw:
            depth = {} if config.depth is None else {"depth": config.depth}
            kw.setdefault("kernel_fn",
                          archs.kernel(config.arch, num_classes=d.num_classes, **depth))
            kw.setdefault("get", config.get)
            kw.setdefault("reg", config.reg)
        return cls(d.x_train, d.labels_train, d.num_classes, **kw)

    # -- probabilities
    @property
    def probs(self) -> np.ndarray:
        """The current sampling probabilities ``p`` (sum to 1), as used for the weights."""
        return self._probs.copy()

    @property
    def refreshed_at(self) -> int:
        """The step the probabilities were computed at (-1: not yet, uniform)."""
        return self._step

    def _mix(self, losses: np.ndarray) -> np.ndarray:
        N, C = len(losses), self.num_classes
        if not self.stratify:
            total = losses.sum()
            share = losses / total if total > 0 else np.full(N, 1.0 / N)
            return (1 - self.mix) * share + self.mix / N
        p = np.zeros(N)
        for idx in self.by_class:
            total = losses[idx].sum()
            share = losses[idx] / total if total > 0 else np.full(len(idx), 1.0 / len(idx))
            p[idx] = ((1 - self.mix) * share + self.mix / len(idx)) / C
        return p

    def point_losses(self, step: int, support: dict) -> np.ndarray:
        """The losses the probabilities of ``step`` are built from (pool + class means)."""
        N = len(self.x)
        if self.pool_size is None:
            pool = np.arange(N)
        else:
            rng = np.random.default_rng([self.seed, step, 1])
            pool = np.sort(rng.choice(N, self.pool_size, replace=False))
        losses = np.empty(len(pool))
        bs = min(self.block_size, len(pool))
        for start, stop in krr.block_slices(len(pool), bs):
            rows = pool[start:stop]
            out = np.asarray(self.loss_fn(support, _pad(self.x[rows], bs),
                                          _pad(self.y[rows], bs)), np.float64)
            if out.shape != (bs,):
                raise ValueError(f"loss_fn must return one loss per row, shape ({bs},), got "
                                 f"{out.shape}.")
            losses[start:stop] = out[: stop - start]
        if not np.isfinite(losses).all() or (losses < 0).any():
            raise ValueError(
                f"loss_fn returned {int((~np.isfinite(losses)).sum())} NaN/Inf and "
                f"{int((losses < 0).sum())} negative losses at step {step}: losses must be "
                "finite and >= 0."
            )
        if self.pool_size is None:
            return losses
        full = np.full(N, losses.mean())
        pool_labels = self.labels[pool]
        for c in range(self.num_classes):
            in_c = pool_labels == c
            if in_c.any():
                full[self.labels == c] = losses[in_c].mean()
        full[pool] = losses
        return full

    def refresh(self, step: int, support: dict) -> None:
        """Recompute the probabilities from ``support`` (done by :meth:`sample` on time)."""
        t0 = time.perf_counter()
        losses = self.point_losses(step, support)
        self._probs, self._step = self._mix(losses), int(step)
        self.last_losses = losses
        self.refresh_seconds += time.perf_counter() - t0

    def sample(self, step: int, support: dict) -> tuple[np.ndarray, np.ndarray | None]:
        """``(indices, weights)`` of ``step``'s batch (see the class docstring)."""
        due = (step // self.refresh_every) * self.refresh_every
        if self._step != due:
            self.refresh(step, support)
        rng = np.random.default_rng([self.seed, step, 0])
        N = len(self.x)
        if not self.stratify:
            p = self._probs / self._probs.sum()
            idx = rng.choice(N, self.batch_size, replace=True, p=p)
            q = p[idx]
        else:
            per = self.batch_size // self.num_classes
            parts, qs = [], []
            for members in self.by_class:
                pc = self._probs[members]
                pc = pc / pc.sum()
                j = rng.choice(len(members), per, replace=True, p=pc)
                parts.append(members[j])
                qs.append(pc[j] / self.num_classes)  # P(a draw is this point) per slot
            idx, q = np.concatenate(parts), np.concatenate(qs)
        return idx, (1.0 / (N * q) if self.weighted else None)

    # -- exact resume
    def state(self) -> dict:
        """``dict(probs=(N,) float64, step=int64)``: what a resumed run needs."""
        return {"probs": self._probs.copy(), "step": np.asarray(self._step, np.int64)}

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state` (as saved in a KIP checkpoint)."""
        probs = np.asarray(state["probs"], np.float64)
        if probs.shape != self._probs.shape:
            raise ValueError(f"state['probs'] has shape {probs.shape}, this sampler needs "
                             f"{self._probs.shape} (another training set?).")
        if not (np.isfinite(probs).all() and (probs > 0).all()):
            raise ValueError("state['probs'] must be positive and finite.")
        self._probs, self._step = probs.copy(), int(np.asarray(state["step"]))
