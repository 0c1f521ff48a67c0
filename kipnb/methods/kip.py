r"""KIP (Kernel Inducing Points): learn a small support set by gradient descent on KRR's loss.

Nguyen, Chen, Lee, "Dataset Meta-Learning from Kernel Ridge Regression" (ICLR 2021) and
Nguyen, Novak, Xiao, Lee, "Dataset Distillation with Infinitely Wide Convolutional
Networks" (NeurIPS 2021). With support images :math:`X_s` and labels :math:`Y_s`, and a
batch of real targets :math:`(X_t, Y_t)` drawn afresh every step::

    pred = K(X_t, X_s) (K(X_s, X_s) + lam I)^{-1} Y_s,   lam = reg * trace(K_ss) / n_s
    loss = 0.5 * mean over targets and classes of (pred - Y_t)^2

and Adam (optax) moves :math:`X_s` (and :math:`Y_s` when ``learn_labels``) down the
gradient of ``loss``. Targets are centered one-hot vectors (one-hot minus 1/C).

Usage::

    cfg = KIPConfig(dataset="fashion_mnist", arch="fc", ipc=10, steps=1000)
    result = run(cfg, checkpoint_dir="build/kip_fc_ipc10")   # resumes if killed
    result.distilled.save("kip.npz"); result.history["test_acc"]

Design notes

* **Determinism and resume.** The support set is initialized from ``seed``; the target
  batch of step ``s`` is drawn by ``numpy.random.default_rng([seed, s])``, so it does
  not depend on what happened before. Every ``checkpoint_every`` steps the whole state
  (support set, optimizer state, history, elapsed time) is written atomically to
  ``checkpoint_dir/kip_checkpoint.npz``; a run started again with the same config and
  directory continues from there and ends with exactly the same distilled set as an
  uninterrupted run (on the same machine and JAX version). ``steps`` may be raised to
  continue a finished run; any other config change is refused (``CheckpointError``).
* **NaN/Inf** in the loss or its gradient stops the run with :class:`KIPNumericalError`
  naming the step; the update is not applied and the checkpoint on disk (the last good
  state) is kept.
* **Batches.** ``target_sampling='class_balanced'`` (``target_batch_size // C`` per
  class) or ``'uniform'``. A ``batch_sampler`` object (e.g. importance sampling,
  :mod:`kipnb.sampling`) can replace both; see :class:`BatchSampler`.
* **Distilled set.** :class:`kipnb.DistilledSet` (format 2): the learned model-space
  images with the fitted transform (``ds.to_pixels()`` for display), the learned labels
  as ``label_kind='regression'``, the class each image started as in ``classes``, and
  the source (kernel, config, dataset, training-data fingerprint).
* **Devices.** Every step's target batch (``x_t``, ``y_t`` and the sampler's weights)
  is split over all devices along the batch axis (:mod:`kipnb.shard`, mesh axis
  ``'data'``) and the support set and optimizer state are replicated, so ``jax.jit``
  partitions the kernel ``K(X_t, X_s)`` over the devices; one device is a mesh of
  size one. Target batches are not padded (padding would change the mean loss): a
  batch whose size is not a multiple of the device count is replicated instead (same
  result, no speed-up), so pick ``target_batch_size`` as a multiple of
  ``jax.device_count()`` (with class-balanced sampling the batch holds
  ``(target_batch_size // C) * C`` targets).
* **Precision.** Kernels and the KRR solve run at ``Precision.HIGHEST`` in the inputs'
  dtype; ``float64=True`` needs ``jax.config.update('jax_enable_x64', True)`` first.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.linalg import cho_factor, cho_solve

from kipnb import archs, data, evaluate, krr, loop, preprocess, shard
from kipnb.checkpoint import CheckpointError
from kipnb.distilled import DistilledSet

__all__ = [
    "PARAMETER_SETS",
    "BatchSampler",
    "CheckpointError",
    "KIPBatch",
    "KIPConfig",
    "KIPData",
    "KIPNumericalError",
    "KIPResult",
    "KIPState",
    "checkpoint_dir_for",
    "evaluate_krr",
    "init_support",
    "kernel_for",
    "init",
    "kip_loss",
    "make_batch",
    "prepare",
    "run",
    "target_batch",
    "update",
]

CHECKPOINT_NAME = "kip_checkpoint.npz"
HIGHEST = jax.lax.Precision.HIGHEST

# Fields that may differ between a checkpoint and the run resuming from it.
_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "eval_every", "eval_test_size"}


class KIPNumericalError(krr.NumericalError):
    """The KIP loss or its gradient became NaN/Inf."""


@dataclass(frozen=True)
class KIPConfig:
    """Everything that determines a KIP run (frozen; ``dataclasses.replace`` to vary).

    Attributes:
      dataset: a :mod:`kipnb.data` name (``'fashion_mnist'``, ``'cifar10'``, ``'digits'``...).
      arch, depth: the kernel's architecture, :func:`kipnb.archs.get` (``'fc'`` or
        ``'conv'``); ``depth=None`` is the architecture's default (3).
      get: ``'ntk'`` or ``'nngp'``.
      ipc: support images per class.
      steps: optimizer steps.
      learning_rate: Adam's learning rate (images and labels).
      target_batch_size: real targets per step (all of the training set if larger).
      target_sampling: ``'class_balanced'`` or ``'uniform'``.
      learn_labels, learn_images: which parts of the support set are learned.
      reg: KRR's relative ridge, ``lam = reg * trace(K_ss) / n_s``.
      preprocessing, zca_reg: :func:`kipnb.data.prepare` method (``'zca'``: KIP's
        relative ZCA; ``'zca_kornia'``: MTT's absolute one) and ZCA strength.
      init: ``'real'`` (class-balanced random training images) or ``'noise'``
        (standard normal images in model space).
      seed: initialization and target batches.
      eval_every: KRR test accuracy every this many steps (and at the start and end);
        0 turns evaluation off.
      eval_test_size: test images for those evaluations (None: all of them).
      checkpoint_every: steps between checkpoints (when a ``checkpoint_dir`` is given).
      float64: compute in float64 (enable ``jax_enable_x64`` first).
    """

    dataset: str = "fashion_mnist"
    arch: str = "fc"
    depth: int | None = None
    get: str = "ntk"
    ipc: int = 10
    steps: int = 1000
    learning_rate: float = 0.01
    target_batch_size: int = 5000
    target_sampling: str = "class_balanced"
    learn_labels: bool = True
    learn_images: bool = True
    reg: float = 1e-6
    preprocessing: str = "standardize"
    zca_reg: float = 0.1
    init: str = "real"
    seed: int = 0
    eval_every: int = 100
    eval_test_size: int | None = 10000
    checkpoint_every: int = 100
    float64: bool = False

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"KIPConfig.{name}={getattr(self, name)!r}: {why}")

        if self.arch not in archs.ARCHS:
            bad("arch", f"unknown architecture; use one of {sorted(archs.ARCHS)}.")
        if self.depth is not None and (not isinstance(self.depth, int) or self.depth < 1):
            bad("depth", "must be a positive integer or None (the architecture's default).")
        if self.get not in ("ntk", "nngp"):
            bad("get", "use 'ntk' or 'nngp'.")
        for name in ("ipc", "steps", "target_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                bad(name, "must be a positive integer" + (" or 0" if name == "steps" else "") + ".")
        for name in ("eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, "must be a non-negative integer (0: never).")
        if self.eval_test_size is not None and self.eval_test_size < 1:
            bad("eval_test_size", "must be positive, or None for the whole test set.")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be positive.")
        if not self.reg > 0:
            bad("reg", "must be positive (e.g. 1e-6): KRR needs a ridge to stay solvable.")
        if self.target_sampling not in ("class_balanced", "uniform"):
            bad("target_sampling", "use 'class_balanced' or 'uniform'.")
        if self.preprocessing not in preprocess.METHODS:
            bad("preprocessing", f"use one of {', '.join(preprocess.METHODS)}.")
        if self.init not in ("real", "noise"):
            bad("init", "use 'real' or 'noise'.")
        if not (self.learn_images or self.learn_labels):
            bad("learn_images", "nothing to learn: set learn_images or learn_labels.")

    @property
    def dtype(self):
        return jnp.float64 if self.float64 else jnp.float32


#: Named parameter sets for reproductions (``dataclasses.replace`` them to vary).
PARAMETER_SETS: dict[str, KIPConfig] = {
    # The original KIP Colab (google-research/kip): CIFAR-10, FC kernel of depth 1, 100
    # support images, Adam 0.04, 5000 targets per step, 300 steps: test accuracy about
    # 0.467. Needs the CIFAR-10 files (python -m kipnb.data fetch cifar10).
    "cifar10_kip_colab": KIPConfig(
        dataset="cifar10", arch="fc", depth=1, ipc=10, steps=300, learning_rate=0.04,
        target_batch_size=5000, target_sampling="uniform", learn_labels=False,
        preprocessing="standardize", eval_every=100, eval_test_size=None,
    ),
    # Fashion-MNIST runs that fit in minutes on a laptop CPU (benchmarks/kip_fashion.py).
    "fashion_fc_ipc1": KIPConfig(ipc=1, steps=3000, learning_rate=0.01),
    "fashion_fc_ipc10": KIPConfig(ipc=10, steps=2000, learning_rate=0.01),
    "fashion_fc_ipc50": KIPConfig(ipc=50, steps=1000, learning_rate=0.01),
}


class BatchSampler(Protocol):
    """What :func:`run` needs from a custom target-batch sampler.

    ``sample(step, support)`` returns ``(indices, weights)``: training-set indices of the
    step's targets, and per-target weights (``None``: all 1) that multiply each target's
    loss, e.g. ``1 / (n * p_i)`` so that importance sampling stays unbiased. ``support`` is
    ``dict(images=..., labels=...)``, the current support set in model space (a sampler
    may refresh its probabilities from it). For exact resume, a sampler with state
    implements ``state() -> dict of arrays`` and ``restore(state)``; they are saved in
    and restored from KIP's checkpoints.
    """

    def sample(self, step: int, support: dict) -> tuple[np.ndarray, np.ndarray | None]: ...


#: KIP's data: :class:`kipnb.data.Data` (one data type for every method).
KIPData = data.Data


@dataclass(frozen=True, eq=False)
class KIPResult:
    """What :func:`run` returns: the distilled set, the history and the final state."""

    distilled: DistilledSet
    history: dict
    config: KIPConfig
    support: dict = field(default_factory=dict)  # model-space images and labels (arrays)


def prepare(
    config: KIPConfig | str = "fashion_mnist",
    *,
    data_dir=None,
    n_train: int | None = None,
) -> KIPData:
    """:func:`kipnb.data.prepare` with ``config``'s dataset, preprocessing and ``zca_reg``.

    ``config``: a :class:`KIPConfig` or a dataset name (then the default preprocessing).
    ``n_train`` keeps the first ``n_train`` training images (quick experiments).
    """
    cfg = config if isinstance(config, KIPConfig) else KIPConfig(dataset=config)
    return data.prepare(cfg.dataset, cfg.preprocessing, zca_reg=cfg.zca_reg,
                        data_dir=data_dir, n_train=n_train)


def kernel_for(config: KIPConfig, num_classes: int = 10) -> Callable:
    """The ``kernel_fn`` of ``config.arch`` / ``config.depth`` (:func:`kipnb.archs.kernel`)."""
    kw = {} if config.depth is None else {"depth": config.depth}
    return archs.kernel(config.arch, num_classes=num_classes, **kw)


def kip_loss(kernel_fn, get: str, reg, x_s, y_s, x_t, y_t, weights=None):
    """KIP's loss and the batch accuracy: ``(loss, acc)``; differentiable in x_s, y_s.

    ``loss = 0.5 * mean_i w_i * mean_c (pred_ic - y_t,ic)^2`` with ``w_i = 1`` by default.
    """
    k_ss = kernel_fn(x_s, None, get)
    k_ts = kernel_fn(x_t, x_s, get)
    lower, _ = cho_factor(krr.regularized(k_ss, reg), lower=True)
    pred = jnp.matmul(k_ts, cho_solve((lower, True), y_s), precision=HIGHEST)
    per_target = 0.5 * jnp.mean((pred - y_t) ** 2, axis=1)
    if weights is not None:
        per_target = per_target * weights
    acc = jnp.mean(jnp.argmax(pred, 1) == jnp.argmax(y_t, 1))
    return jnp.mean(per_target), acc


class KIPState(NamedTuple):
    """KIP's optimizer state: the support set (split into learned and fixed parts) and Adam's.

    Attributes:
      trainable: the learned parts of the support set, e.g. ``{'images': ..., 'labels':
        ...}`` (model space; which parts follows ``learn_images`` / ``learn_labels``).
      fixed: the parts that are not learned.
      opt_state: optax's Adam state of ``trainable``.
    """

    trainable: dict
    fixed: dict
    opt_state: Any

    @property
    def support(self) -> dict:
        """The whole support set, ``dict(images=..., labels=...)``."""
        return {**self.fixed, **self.trainable}


class KIPBatch(NamedTuple):
    """One step's real targets: model-space images, label vectors, per-target weights.

    Attributes:
      x: ``(b, H, W, C)`` images (split over the devices when ``b`` is a multiple of them).
      y: ``(b, num_classes)`` centered one-hot targets.
      weights: ``(b,)`` loss weights, or None (all 1).
    """

    x: Any
    y: Any
    weights: Any = None


def _optimizer(config: KIPConfig):
    return optax.adam(config.learning_rate)


def _split(config: KIPConfig, support: dict) -> tuple[dict, dict]:
    learn = {"images": config.learn_images, "labels": config.learn_labels}
    trainable = {k: v for k, v in support.items() if learn[k]}
    fixed = {k: v for k, v in support.items() if not learn[k]}
    return trainable, fixed


_STEP_CACHE: dict = {}


def _step_fn(config: KIPConfig, kernel_fn):
    key = (kernel_fn, config.get, config.reg, config.learning_rate)
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]
    opt = _optimizer(config)

    @jax.jit
    def step(trainable, fixed, opt_state, x_t, y_t, w):
        def loss_fn(tr):
            p = {**fixed, **tr}
            return kip_loss(kernel_fn, config.get, config.reg, p["images"], p["labels"],
                            x_t, y_t, w)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, new_state = opt.update(grads, opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        return new, new_state, loss, acc, finite

    _STEP_CACHE[key] = step
    return step


def _place_targets(m, x_t, y_t, w):
    """Targets split over the mesh's devices, or replicated if not a multiple of them."""
    if len(x_t) % shard.device_count(m) == 0:
        put = functools.partial(shard.shard_batch, m=m)
    else:
        put = functools.partial(shard.replicate, m=m)
    return put(x_t), put(y_t), None if w is None else put(w)


def _class_index(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


_BY_CLASS: dict = {}


def _class_index_cached(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """:func:`_class_index`, remembered for the last labels array (one per run)."""
    key = (id(labels), len(labels), num_classes)
    hit = _BY_CLASS.get("last")
    if hit is None or hit[0] != key or hit[1] is not labels:
        _BY_CLASS["last"] = (key, labels, _class_index(labels, num_classes))
    return _BY_CLASS["last"][2]


def _target_indices(config: KIPConfig, step: int, by_class, n_train: int) -> np.ndarray:
    """The real targets of ``step``: a function of (seed, step) only."""
    rng = np.random.default_rng([config.seed, step])
    if config.target_batch_size >= n_train:
        return np.arange(n_train)
    if config.target_sampling == "uniform":
        return np.sort(rng.choice(n_train, config.target_batch_size, replace=False))
    per = max(1, config.target_batch_size // len(by_class))
    return np.concatenate(
        [idx if per >= len(idx) else rng.choice(idx, per, replace=False) for idx in by_class]
    )


def make_batch(config: KIPConfig, images, labels, num_classes: int, weights=None) -> KIPBatch:
    """A :class:`KIPBatch` from model-space ``images`` and integer ``labels``.

    The images are cast to the config's dtype, the labels become centered one-hot
    targets, and all are split over the devices (replicated if the batch size is not a
    multiple of the device count).

    Args:
      config: the :class:`KIPConfig` (its dtype).
      images: ``(b, H, W, C)`` model-space images.
      labels: ``(b,)`` integer classes.
      num_classes: the number of classes.
      weights: ``(b,)`` per-target loss weights, or None.

    Returns:
      A :class:`KIPBatch` ready for :func:`update`.

    Example:
      >>> b = make_batch(KIPConfig(), np.zeros((4, 2, 2, 1)), np.arange(4), 4)
      >>> b.x.shape, b.y.shape, b.weights
      ((4, 2, 2, 1), (4, 4), None)
    """
    y = krr.one_hot(labels, num_classes, True, np.dtype(config.dtype))
    x, y, w = _place_targets(shard.mesh(), np.asarray(images, config.dtype), y,
                             None if weights is None else np.asarray(weights, config.dtype))
    return KIPBatch(x, y, w)


def target_batch(config: KIPConfig, d, step: int, state: KIPState | None = None,
                 sampler: BatchSampler | None = None) -> KIPBatch:
    """The real targets of step ``step`` (0-based): a function of ``(seed, step)`` only.

    Args:
      config: the :class:`KIPConfig` (``target_batch_size``, ``target_sampling``, ``seed``).
      d: the preprocessed data (:func:`prepare`).
      step: the step index, 0-based.
      state: the current state (passed to ``sampler``).
      sampler: a :class:`BatchSampler` replacing the built-in sampling.

    Returns:
      A :class:`KIPBatch`.

    Example:
      >>> d = prepare("digits")
      >>> b = target_batch(KIPConfig(dataset="digits", target_batch_size=100), d, 0)
      >>> b.x.shape, b.y.shape
      ((100, 8, 8, 1), (100, 10))
    """
    if sampler is not None:
        idx, w = sampler.sample(step, {} if state is None else state.support)
        idx = np.asarray(idx)
    else:
        by_class = _class_index_cached(d.labels_train, d.num_classes)
        idx, w = _target_indices(config, step, by_class, len(d.labels_train)), None
    return make_batch(config, d.x_train[idx], d.labels_train[idx], d.num_classes, w)


def init(config: KIPConfig, d=None, *, support: dict | None = None) -> KIPState:
    """KIP's starting state: the support set (given, or :func:`init_support`'s) and Adam's.

    Args:
      config: the :class:`KIPConfig`.
      d: the preprocessed data (:func:`prepare`); needed unless ``support`` is given.
      support: a starting ``dict(images=(n, H, W, C), labels=(n, C))`` in model space
        (checked against ``d`` when both are given).

    Returns:
      A :class:`KIPState`, replicated over the devices.

    Example:
      >>> import numpy as np
      >>> s = init(KIPConfig(), support={"images": np.zeros((2, 4, 4, 1)),
      ...                                "labels": np.eye(2)})
      >>> sorted(s.trainable), s.support["images"].shape
      (['images', 'labels'], (2, 4, 4, 1))
    """
    if support is None:
        if d is None:
            raise ValueError("kip.init needs the data (to draw the support set) or support=.")
        support = init_support(config, d)
    elif d is not None:
        support = _check_initial(support, config, d)
    else:
        support = {k: jnp.asarray(v, config.dtype) for k, v in support.items()}
    trainable, fixed = _split(config, support)
    state = KIPState(trainable, fixed, _optimizer(config).init(trainable))
    return shard.replicate(state, shard.mesh())


def update(config: KIPConfig, state: KIPState, batch: KIPBatch) -> tuple[KIPState, dict]:
    """One KIP step: the loss on ``batch``, its gradient, and Adam's update.

    Args:
      config: the :class:`KIPConfig` (kernel, ``reg``, ``learning_rate``).
      state: the current :class:`KIPState`.
      batch: the step's targets (:func:`target_batch` or :func:`make_batch`).

    Returns:
      ``(new_state, metrics)``; ``metrics``: ``loss`` and ``batch_acc`` (0-d arrays, the
      values before the update) and ``finite`` (False when the loss or the gradient is
      NaN/Inf: then do not use ``new_state``).

    Example:
      >>> cfg = KIPConfig(arch="fc", depth=1)
      >>> rng = np.random.default_rng(0)
      >>> s = init(cfg, support={"images": rng.normal(size=(4, 4, 4, 1)),
      ...                        "labels": krr.one_hot_targets(np.arange(4) % 2, 2)})
      >>> b = make_batch(cfg, rng.normal(size=(8, 4, 4, 1)), np.arange(8) % 2, 2)
      >>> s, m = update(cfg, s, b)
      >>> bool(m["finite"]), float(m["loss"]) > 0
      (True, True)
    """
    support = state.support
    kernel_fn = kernel_for(config, support["labels"].shape[1])
    step = _step_fn(config, kernel_fn)
    new, opt_state, loss, acc, finite = step(state.trainable, state.fixed, state.opt_state,
                                             batch.x, batch.y, batch.weights)
    return KIPState(new, state.fixed, opt_state), {"loss": loss, "batch_acc": acc,
                                                   "finite": finite}


def init_support(config: KIPConfig, d: KIPData) -> dict:
    """The starting support set ``dict(images=..., labels=...)`` in model space.

    ``config.init == 'real'``: ``config.ipc`` class-balanced training images drawn with
    ``config.seed`` (classes in order), centered one-hot labels; ``'noise'``: standard
    normal images with the same labels.
    """
    C = d.num_classes
    counts = np.bincount(d.labels_train, minlength=C)
    if config.ipc > counts.min():
        raise ValueError(
            f"Cannot start KIP with {config.ipc} images per class: class "
            f"{int(np.argmin(counts))} ({d.class_names[int(np.argmin(counts))]}) has only "
            f"{counts.min()} training images. Use ipc <= {counts.min()}."
        )
    idx = data.class_balanced_indices(jax.random.key(config.seed), d.labels_train, config.ipc, C)
    labels = d.labels_train[idx]
    if config.init == "real":
        images = d.x_train[idx]
    else:
        rng = np.random.default_rng([config.seed, 2**31 - 1])
        images = rng.standard_normal((len(idx), *d.x_train.shape[1:])).astype(np.float32)
    return {
        "images": jnp.asarray(images, config.dtype),
        "labels": krr.one_hot_targets(labels, C, dtype=config.dtype),
    }


def _check_initial(initial: dict, config: KIPConfig, d: KIPData) -> dict:
    if not isinstance(initial, dict) or set(initial) != {"images", "labels"}:
        raise ValueError("initial must be dict(images=..., labels=...) (model-space arrays).")
    x, y = np.asarray(initial["images"]), np.asarray(initial["labels"])
    if x.ndim != 4 or x.shape[1:] != d.x_train.shape[1:]:
        raise ValueError(
            f"initial images must be (n, {', '.join(map(str, d.x_train.shape[1:]))}) like the "
            f"training images, got {x.shape}."
        )
    if y.shape != (x.shape[0], d.num_classes):
        raise ValueError(
            f"initial labels must be (n, C) = ({x.shape[0]}, {d.num_classes}) label vectors "
            f"(e.g. krr.one_hot_targets(classes, C)), got {y.shape}."
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("initial images or labels contain NaN/Inf.")
    return {"images": jnp.asarray(x, config.dtype), "labels": jnp.asarray(y, config.dtype)}


def _hash_support(support: dict) -> str:
    h = hashlib.sha256()
    for k in ("images", "labels"):
        h.update(np.ascontiguousarray(np.asarray(support[k])).tobytes())
    return h.hexdigest()[:16]


def checkpoint_dir_for(root, config: KIPConfig) -> Path:
    """``root / 'kip_<arch><depth>_ipc<N>_<hash>'``: one checkpoint directory per config.

    The hash covers every field that changes the run (not ``steps``, ``eval_every``...),
    so changing a parameter in a notebook and running again starts a fresh run instead
    of tripping over the old checkpoint, and going back resumes the old one.
    """
    import json

    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE_CHANGES}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    depth = "" if config.depth is None else config.depth
    return Path(root) / f"kip_{config.arch}{depth}_ipc{config.ipc}_{h}"


def _empty_history() -> dict:
    return {"step": [], "loss": [], "batch_acc": [], "eval_step": [], "test_acc": [],
            "test_mse": [], "wall_time": []}


def evaluate_krr(x_s, y_s, d: KIPData, **kw) -> float:
    """Alias: KRR accuracy of model-space ``(x_s, y_s)``; see :func:`kipnb.evaluate.krr`."""
    ds = DistilledSet(np.asarray(x_s), np.asarray(y_s), "regression", transform=d.transform)
    return evaluate.krr(ds, d, **{"kernel": kw.pop("arch", "fc"), **kw}).mean


def run(
    config: KIPConfig,
    d: KIPData | None = None,
    *,
    checkpoint_dir=None,
    callback: Callable[[dict], Any] | None = None,
    progress: bool = True,
    batch_sampler: BatchSampler | None = None,
    initial: dict | None = None,
    data_dir=None,
) -> KIPResult:
    """Run KIP; returns a :class:`KIPResult` (distilled set, history, final support set).

    This is :func:`kipnb.loop.run` over the public step functions :func:`init`,
    :func:`target_batch` and :func:`update` (call those to own the loop).

    Args:
      config: the :class:`KIPConfig`.
      d: preprocessed data from :func:`prepare` (loaded from ``config`` if None).
      checkpoint_dir: where ``kip_checkpoint.npz`` is written every
        ``config.checkpoint_every`` steps and at the end; if it already holds a checkpoint
        of the same config, the run resumes from it.
      callback: called after every step with a dict (``step``, ``loss``, ``batch_acc``,
        and ``test_acc`` on evaluation steps, ``last`` on the final step); e.g.
        :class:`kipnb.viz.LivePlot`.
      progress: tqdm progress bar.
      batch_sampler: replaces the built-in target sampling (see :class:`BatchSampler`).
      initial: a starting support set ``dict(images=(n, H, W, C) model-space images,
        labels=(n, C) label vectors)`` instead of :func:`init_support`'s (e.g. from
        importance sampling, :mod:`kipnb.sampling`); a checkpoint remembers a hash of it
        and refuses to resume a run that started elsewhere.

    History (lists): ``step``, ``loss``, ``batch_acc`` per step; ``eval_step``,
    ``test_acc``, ``test_mse`` per evaluation; ``wall_time`` (seconds since the start,
    summed over resumed sessions) per evaluation.
    """
    if not isinstance(config, KIPConfig):
        raise TypeError(f"config must be a KIPConfig, got {type(config).__name__}.")
    if config.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "KIPConfig.float64=True needs 64-bit JAX: call "
            "jax.config.update('jax_enable_x64', True) before creating any arrays."
        )
    if d is None:
        d = prepare(config, data_dir=data_dir)
    if d.dataset != config.dataset:
        raise ValueError(
            f"The data are {d.dataset!r} but config.dataset is {config.dataset!r}: prepare "
            "the data from this config (kip.prepare(config))."
        )
    C = d.num_classes
    kernel_fn = kernel_for(config, C)
    support = init_support(config, d) if initial is None else _check_initial(initial, config, d)
    classes = np.asarray(support["labels"]).argmax(axis=1).astype(np.int32)
    state = init(config, support=support)
    cfg_dict = dataclasses.asdict(config)
    mesh = shard.mesh()

    def pack(s: KIPState) -> dict:
        s_state = batch_sampler.state() if hasattr(batch_sampler, "state") else {}
        return {"trainable": s.trainable, "fixed": s.fixed, "opt_state": s.opt_state,
                "sampler": s_state}

    def unpack(tree: dict) -> KIPState:
        if tree["sampler"]:
            batch_sampler.restore(tree["sampler"])
        s = jax.tree_util.tree_map(jnp.asarray, (tree["trainable"], tree["fixed"],
                                                 tree["opt_state"]))
        return shard.replicate(KIPState(*s), mesh)

    def evaluate(s: KIPState, step: int) -> dict:
        p = s.support
        n = config.eval_test_size
        n = len(d.x_test) if n is None else min(n, len(d.x_test))
        out = krr.krr_evaluate(kernel_fn, p["images"], p["labels"],
                               d.x_test[:n].astype(config.dtype), d.labels_test[:n],
                               reg=config.reg, get=config.get, block_size=min(1000, n))
        return {"test_acc": out["accuracy"], "test_mse": out["mse"]}

    def nan_error(step: int, metrics: dict, kept: str) -> Exception:
        return KIPNumericalError(
            f"KIP step {step}: the loss or its gradient is NaN/Inf (loss={metrics['loss']}); "
            f"the update was not applied. {kept} Fixes: raise reg (now "
            f"{config.reg:g}; try 1e-4), lower learning_rate (now "
            f"{config.learning_rate:g}), or compute in float64 "
            "(jax.config.update('jax_enable_x64', True) and float64=True)."
        )

    user_callback = callback
    if callback is not None:
        def callback(info):  # noqa: F811 (the user's callback without the state)
            return user_callback({k: v for k, v in info.items() if k != "state"})

    evaluating = config.eval_every > 0
    out = loop.run(
        state, functools.partial(update, config), config.steps,
        batch_fn=lambda step, s: target_batch(config, d, step, s, batch_sampler),
        history=_empty_history(), step_key="step",
        evaluate=evaluate if evaluating else None, eval_every=config.eval_every,
        eval_at_start=evaluating, eval_at_end=evaluating,
        checkpoint_path=None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME,
        checkpoint_every=config.checkpoint_every, config=cfg_dict,
        fingerprint=d.fingerprint() + "/" + _hash_support(support), free=_RESUMABLE_CHANGES,
        what="KIP", data_why="the training data or initial support differ",
        pack=pack, unpack=unpack, nan_error=nan_error, callback=callback,
        progress_bar=progress, desc="KIP",
    )
    history = out.history
    support = {k: np.asarray(v) for k, v in out.state.support.items()}
    kernel = f"{config.arch}{'' if config.depth is None else config.depth}-{config.get}"
    distilled = DistilledSet(
        images=support["images"],
        labels=support["labels"],
        label_kind="regression",
        num_classes=C,
        classes=classes,
        transform=d.transform,
        source={"method": "kip", "learner": f"krr {kernel}", "config": cfg_dict,
                "dataset": config.dataset, "ipc": config.ipc,
                "data_fingerprint": d.fingerprint(),
                "init": "given" if initial is not None else config.init},
        extra={
            "steps": config.steps,
            "test_acc": history["test_acc"][-1] if history["test_acc"] else None,
            "kernel": kernel,
        },
    )
    return KIPResult(distilled=distilled, history=history, config=config, support=support)
