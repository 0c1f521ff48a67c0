"""The finite-network trainer (optax), and KIP's transfer: networks trained on a support set.

The trainer
-----------
One trainer trains every finite network in kipnb: the experts and the evaluation networks
of trajectory matching (:mod:`kipnb.experts`) and the transfer networks below. It is
optax-style, four functions and a state:

* :func:`make_optimizer` -- ``'sgd'`` exactly as ``torch.optim.SGD`` (momentum, weight
  decay; MTT/DATM) or ``'adam'`` (AdamW with weight decay), a number or an optax schedule
  as learning rate; the hyperparameters live in the optimizer state, so they can change
  between steps (:func:`set_hyperparams`) without recompiling;
* :func:`init` -- a :class:`TrainState` ``(params, opt_state)``;
* :func:`make_step` -- one jitted step: minibatch by index (or drawn at random), DSA
  augmentation (:mod:`kipnb.augment`), a centered or plain forward pass, the loss
  (:func:`loss_fn`: MSE, cross-entropy on hard, soft or logit labels), the update;
  inputs sharded over devices (:mod:`kipnb.shard`) stay sharded;
* :func:`epoch` -- one pass over a permutation in minibatches.

:func:`momentum` / :func:`with_momentum` read and set SGD's momentum buffer (the experts
save it for an exact resume).

Transfer
--------

A distilled set is made for one learner -- in KIP and Label Solve, kernel ridge
regression (KRR) with the infinite-width NTK of an architecture -- but the KIP papers
(Nguyen, Chen, Lee 2021; Nguyen, Novak, Xiao, Lee 2021) also ask whether it
*transfers*: does an ordinary finite-width network, trained by gradient descent on
those few images and their (possibly learned) labels, do well on the real test set?

:func:`train_network` trains one network and :func:`transfer` repeats that over seeds
(initializations, and minibatch orders when there are minibatches) and reports the
mean and standard deviation of the final test accuracies.

The networks are the *same* ``kipnb.archs`` networks whose infinite-width limit is
the kernel KIP uses: NTK parameterization (standard normal weights, scaled by
``W_std / sqrt(fan_in)`` in the forward pass), ``W_std = sqrt(2)``, ``b_std = 0.1``,
ReLU. Only the width is finite, so transfer is a clean test of "kernel -> network".

Defaults (:class:`TrainConfig`) and why
---------------------------------------
* ``loss='mse'``, ``center=True``: the network is trained to regress its *centered*
  output ``f(theta, x) - f(theta_0, x)`` onto the labels as given (centered one-hot,
  or real-valued labels learned by KIP / Label Solve), with
  ``loss = 0.5 * mean_i sum_c (out_c(x_i) - y_ic)^2``. Trained by gradient descent,
  this centered network tends, as the width grows, to exactly the NTK KRR that KIP
  distils for (ridge 0). Without centering the random initial function
  ``f(theta_0, x)`` -- of variance ``K_nngp(x, x)``, about 2 for standardized inputs
  -- stays in the predictions as noise as large as the labels: on digits with 10
  images per class an FC-3 of width 1024 reaches 0.93 test accuracy centered (KRR
  with its NTK: 0.93) but only 0.58-0.66 uncentered. ``center=False`` trains the
  plain network ``f(theta, x)``; ConvNets suffer less (pooling averages the noise).
  A centered network keeps its initial parameters (``init_params`` in the result).
* ``loss='xent'`` is softmax cross-entropy on the hard labels ``argmax(y)``; with
  ``soft_xent=True`` the label rows themselves are the target distributions (they must
  be non-negative and sum to 1). Learned real-valued labels need ``'mse'``.
* ``optimizer='adam'``, ``learning_rate=1e-3``, ``steps=1000``: in the NTK
  parameterization a weight moves the output by ``~W_std / sqrt(fan_in)``, and
  Adam's steps of about ``learning_rate`` per weight fit 10-100 support images (loss
  below 1e-3) within 1000 steps without diverging, for FC and ConvNet, at any width.
  ``'sgd'`` (momentum 0.9) needs learning rates around 0.1-1 in this
  parameterization; on standardized digits a width-256 FC-3 diverges at 2.
* ``batch_size=None``: full-batch steps, the usual case for distilled sets of at most a
  few hundred images. With a ``batch_size``, each step draws that many distinct
  support images at random.
* ``width=None``/``depth=None``: the architecture's defaults (FC: depth 3, width 1024;
  ConvNet: depth 3, width 128), i.e. the depth of the kernels KIP distils with. Use the
  depth of the kernel the set was distilled with; on CPU, smaller widths are quicker.
* Only the *final* test accuracy is reported (no model selection on the test set);
  ``eval_every`` records a curve in ``history`` for plots.

Devices: the parameters are replicated and the training batch and evaluation blocks
are split over all devices (:mod:`kipnb.shard`) when their size is a multiple of the
device count (else replicated, with the same result).

Inputs are NHWC images ``(N, H, W, C)`` preprocessed exactly as the support set was
(fit the preprocessing on the training split, apply it to the test split). Training
runs in float32 even when ``jax_enable_x64`` is on. Each step is one jit-compiled
function, dispatched asynchronously from a Python loop; the host waits for the device
every 100 steps (NaN check, progress bar). (A ``lax.scan`` over steps is ~25x slower
for ConvNets on CPU: XLA's CPU convolutions inside loops are slow.) The compiled code
is cached per configuration and input shapes, so the seeds of :func:`transfer`
compile once. The test set is evaluated in blocks of ``eval_batch_size`` images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kipnb import archs, krr, shard
from kipnb import augment as augment_lib
from kipnb.checks import is_int as _is_int
from kipnb.distilled import DistilledSet

__all__ = [
    "ARCH_DEFAULTS",
    "LOSSES",
    "OPTIMIZERS",
    "STEP_LOSSES",
    "TrainConfig",
    "TrainState",
    "epoch",
    "init",
    "loss_fn",
    "make_optimizer",
    "make_step",
    "momentum",
    "set_hyperparams",
    "train_network",
    "transfer",
    "with_momentum",
]

#: Width and depth used when :class:`TrainConfig` leaves them as None.
ARCH_DEFAULTS = {"fc": {"width": 1024, "depth": 3}, "conv": {"width": 128, "depth": 3}}
#: Losses of :class:`TrainConfig` (``'xent'`` with ``soft_xent=True`` is ``'soft_xent'``).
LOSSES = ("mse", "xent")
#: Losses of :func:`make_step` / :func:`loss_fn`.
STEP_LOSSES = ("mse", "xent", "soft_xent", "logit_xent")
OPTIMIZERS = ("adam", "sgd")

#: Steps between NaN checks and progress-bar updates (the host waits for the device only
#: then).
_CHUNK = 100


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and (
        math.isfinite(float(v))
    )


def _is_pos_real(v) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and (
        math.isfinite(float(v)) and float(v) > 0
    )


@dataclass(frozen=True)
class TrainConfig:
    """How to train the finite networks of a transfer experiment (see the module docstring).

    Attributes:
      arch: ``'fc'`` or ``'conv'`` (``kipnb.archs``).
      width: hidden width (FC units / conv channels); None: 1024 for fc, 128 for conv.
      depth: number of hidden layers / conv blocks; None: 3.
      loss: ``'mse'`` (regress onto the labels as given) or ``'xent'`` (softmax
        cross-entropy on ``argmax`` of the labels, or on the label rows themselves as
        probabilities when ``soft_xent=True``).
      center: train and evaluate ``f(theta, x) - f(theta_0, x)`` (the initial network's
        output subtracted), whose wide limit is NTK regression; False: the plain network.
      soft_xent: with ``loss='xent'``, use the label rows as target distributions.
      optimizer: ``'adam'`` or ``'sgd'`` (with ``momentum``).
      learning_rate: step size (constant).
      momentum: heavy-ball momentum of ``'sgd'``.
      steps: number of optimizer steps.
      batch_size: support images per step; None (or >= the support size): full batch.
      weight_decay: L2 weight decay on all parameters (decoupled, AdamW-style, for adam;
        added to the gradient for sgd).
      seeds: one network per seed in :func:`transfer`.
      eval_every: also evaluate every this many steps (and at step 0) into ``history``;
        None: only at the end.
      eval_batch_size: test images per evaluation block (bounds memory).
    """

    arch: str = "fc"
    width: int | None = None
    depth: int | None = None
    loss: str = "mse"
    center: bool = True
    soft_xent: bool = False
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    steps: int = 1000
    batch_size: int | None = None
    weight_decay: float = 0.0
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int | None = None
    eval_batch_size: int = 500

    def __post_init__(self):
        if self.arch not in ARCH_DEFAULTS:
            raise ValueError(
                f"Unknown arch {self.arch!r}: use one of {sorted(ARCH_DEFAULTS)}."
            )
        if self.width is not None and not (_is_int(self.width) and self.width >= 1):
            raise ValueError(f"width must be a positive integer or None, got {self.width!r}.")
        min_depth = 1 if self.arch == "conv" else 0
        if self.depth is not None and not (_is_int(self.depth) and self.depth >= min_depth):
            raise ValueError(
                f"depth must be an integer >= {min_depth} for arch {self.arch!r} or None, "
                f"got {self.depth!r}."
            )
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}: use one of {list(LOSSES)}.")
        if not isinstance(self.center, bool):
            raise ValueError(f"center must be True or False, got {self.center!r}.")
        if not isinstance(self.soft_xent, bool):
            raise ValueError(f"soft_xent must be True or False, got {self.soft_xent!r}.")
        if self.soft_xent and self.loss != "xent":
            raise ValueError(
                "soft_xent=True only applies to loss='xent'; loss='mse' already regresses "
                "onto the labels as given. Set loss='xent' or soft_xent=False."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"Unknown optimizer {self.optimizer!r}: use one of {list(OPTIMIZERS)}."
            )
        if not _is_pos_real(self.learning_rate):
            raise ValueError(
                f"learning_rate must be a positive finite number, got {self.learning_rate!r}."
            )
        if not (isinstance(self.momentum, int | float) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}.")
        if not (_is_int(self.steps) and self.steps >= 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}.")
        if self.batch_size is not None and not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ValueError(
                f"batch_size must be a positive integer or None (full batch), "
                f"got {self.batch_size!r}."
            )
        if not (
            isinstance(self.weight_decay, int | float)
            and math.isfinite(self.weight_decay)
            and self.weight_decay >= 0
        ):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        seeds = self.seeds
        if _is_int(seeds) or not isinstance(seeds, tuple | list) or not seeds or not all(
            _is_int(s) for s in seeds
        ):
            raise ValueError(
                f"seeds must be a non-empty tuple of integers such as (0, 1, 2), got {seeds!r}."
            )
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        if self.eval_every is not None and not (_is_int(self.eval_every) and self.eval_every >= 1):
            raise ValueError(
                f"eval_every must be a positive integer or None (evaluate only at the end), "
                f"got {self.eval_every!r}."
            )
        if not (_is_int(self.eval_batch_size) and self.eval_batch_size >= 1):
            raise ValueError(
                f"eval_batch_size must be a positive integer, got {self.eval_batch_size!r}."
            )

    @property
    def resolved_width(self) -> int:
        return self.width if self.width is not None else ARCH_DEFAULTS[self.arch]["width"]

    @property
    def resolved_depth(self) -> int:
        return self.depth if self.depth is not None else ARCH_DEFAULTS[self.arch]["depth"]


# ------------------------------------------------------------------------ validation


def _nonfinite_message(a: np.ndarray, name: str, fix: str) -> str | None:
    if np.isfinite(a).all():
        return None
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    rows = np.flatnonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1))
    return (
        f"{name} has {n_nan} NaN and {n_inf} Inf entries (rows {rows[:5].tolist()}"
        f"{'...' if rows.size > 5 else ''}). {fix}"
    )


_FIX_SUPPORT = (
    "Non-finite support images or labels usually mean the distillation diverged: rerun it "
    "with a lower learning rate, or drop those rows."
)


def _check_images(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(
            f"{name} must be NHWC images (N, H, W, C); got shape {x.shape}. Add a channel "
            f"axis (x[..., None]) for grayscale or reshape flat vectors to (N, H, W, C)."
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}.")
    return x


def _as_targets(y, num_classes: int | None) -> np.ndarray:
    """(n, C) float targets: 2-D labels as given, 1-D integers as centered one-hot."""
    y = np.asarray(y)
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"1-D support labels must be integer classes, got dtype {y.dtype}; pass "
                f"(n, C) label vectors for real-valued labels."
            )
        if num_classes is None:
            num_classes = int(y.max()) + 1 if y.size else 1
        return np.asarray(krr.one_hot_targets(y, num_classes, centered=True), dtype=np.float32)
    if y.ndim != 2:
        raise ValueError(
            f"support labels must be (n, C) label vectors or (n,) integer classes, got shape "
            f"{y.shape}."
        )
    return y


def _test_classes(labels_test, n_test: int, num_classes: int) -> np.ndarray:
    lab = np.asarray(labels_test)
    if lab.ndim == 2:
        if lab.shape[1] != num_classes:
            raise ValueError(
                f"labels_test has {lab.shape[1]} columns but the support labels have "
                f"{num_classes} classes."
            )
        lab = lab.argmax(axis=1)
    elif lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(
            f"labels_test must be (n,) integer classes or (n, C) label vectors, got shape "
            f"{lab.shape} and dtype {lab.dtype}."
        )
    if lab.shape[0] != n_test:
        raise ValueError(
            f"labels_test has {lab.shape[0]} rows but x_test has {n_test} images: pass the "
            f"labels of the same test images."
        )
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(
            f"labels_test span [{lab.min()}, {lab.max()}] but the support labels have "
            f"{num_classes} columns (classes): give the support labels one column per class."
        )
    return lab.astype(np.int32)


def _validate(config, x_train, y_train, x_test, labels_test):
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}.")
    x_train = _check_images(x_train, "x_train (support images)")
    x_test = _check_images(x_test, "x_test")
    if x_train.shape[0] == 0:
        raise ValueError("The support set is empty: pass at least one image.")
    lab = np.asarray(labels_test)
    n_classes_hint = None
    if np.asarray(y_train).ndim == 1 and np.asarray(y_train).size and lab.ndim == 1 and lab.size:
        n_classes_hint = int(max(np.asarray(y_train).max(), lab.max())) + 1
    y_train = _as_targets(y_train, n_classes_hint)
    if y_train.shape[0] != x_train.shape[0]:
        raise ValueError(
            f"The support set has {x_train.shape[0]} images but {y_train.shape[0]} label "
            f"rows: labels must have one row per image (same order)."
        )
    if x_test.shape[0] == 0:
        raise ValueError("x_test is empty: pass at least one test image.")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(
            f"Test images have shape {x_test.shape[1:]} but support images {x_train.shape[1:]}: "
            f"preprocess the test split exactly like the support set (same dataset, same "
            f"fitted transform)."
        )
    if not np.issubdtype(y_train.dtype, np.number):
        raise ValueError(f"support labels must be numbers, got dtype {y_train.dtype}.")
    for a, name in ((x_train, "x_train (support images)"), (y_train, "y_train (support labels)")):
        msg = _nonfinite_message(a, name, _FIX_SUPPORT)
        if msg:
            raise ValueError(msg)
    msg = _nonfinite_message(
        x_test, "x_test", "Check the test data and its preprocessing (e.g. a zero std)."
    )
    if msg:
        raise ValueError(msg)
    num_classes = y_train.shape[1]
    if config.loss == "xent" and config.soft_xent:
        if (y_train < 0).any() or not np.allclose(y_train.sum(axis=1), 1.0, atol=1e-3):
            raise ValueError(
                "soft_xent=True needs label rows that are probability distributions "
                "(non-negative, summing to 1); these are not (e.g. centered or learned "
                "labels). Use loss='mse' for real-valued labels, or soft_xent=False to train "
                "on argmax(labels)."
            )
    labels = _test_classes(labels_test, x_test.shape[0], num_classes)
    return x_train, y_train.astype(np.float32), x_test, labels


# ------------------------------------------------------------- the optax trainer


class TrainState(NamedTuple):
    """What one training step changes: the parameters and the optax optimizer state.

    The optimizer's hyperparameters (learning rate; for SGD also momentum and weight
    decay) live in ``opt_state`` (``optax.inject_hyperparams``), so they can change
    between steps (:func:`set_hyperparams`) without recompiling the step.
    """

    params: Any
    opt_state: Any


def _sgd(learning_rate, momentum, weight_decay):
    # torch.optim.SGD (no dampening, no Nesterov): g = grad + wd * p; buf = m * buf + g;
    # p = p - lr * buf. optax.trace's update is g + m * buf; buf starts at zeros, which
    # equals torch's first step buf = g.
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))


def _adam(learning_rate, weight_decay):
    # weight_decay is static: AdamW (decoupled, scaled by the learning rate) when > 0.
    if weight_decay:
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    return optax.adam(learning_rate)


def make_optimizer(
    optimizer: str | TrainConfig = "sgd",
    learning_rate: float | Callable | None = None,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """The optax optimizer of the finite-network trainer.

    ``'sgd'`` is exactly ``torch.optim.SGD(lr, momentum, weight_decay)`` as MTT and DATM
    use it (``g = grad + wd * p; buf = m * buf + g; p -= lr * buf``):
    ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum))`` with the
    learning rate, momentum and weight decay injected as state. ``'adam'`` is
    ``optax.adam(lr)``, or ``optax.adamw(lr, weight_decay=wd)`` (decoupled) when
    ``wd > 0``, with the learning rate injected.

    Args:
      optimizer: ``'sgd'`` or ``'adam'``, or a :class:`TrainConfig` (its ``optimizer``,
        ``learning_rate``, ``momentum`` and ``weight_decay``; the other arguments must
        then be left out).
      learning_rate: a number, or an optax schedule ``step -> learning rate`` (e.g.
        ``optax.cosine_decay_schedule(0.1, 1000)``).
      momentum: SGD's heavy-ball momentum in [0, 1) (ignored by Adam).
      weight_decay: L2 weight decay (>= 0).

    Returns:
      An ``optax.GradientTransformation`` whose state keeps the hyperparameters
      (``opt_state.hyperparams``).

    Example:
      >>> import jax.numpy as jnp
      >>> opt = make_optimizer("sgd", 0.1, momentum=0.9)
      >>> state = init({"w": jnp.ones(2)}, opt)
      >>> round(float(state.opt_state.hyperparams["learning_rate"]), 6)  # float32
      0.1
    """
    if isinstance(optimizer, TrainConfig):
        if learning_rate is not None or momentum or weight_decay:
            raise ValueError("make_optimizer(config): take the hyperparameters from the "
                             "TrainConfig; do not pass them as well.")
        c = optimizer
        return make_optimizer(c.optimizer, c.learning_rate, momentum=c.momentum,
                              weight_decay=c.weight_decay)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}: use one of {list(OPTIMIZERS)}.")
    if learning_rate is None:
        raise ValueError("make_optimizer needs a learning_rate (a number or a schedule).")
    if not callable(learning_rate) and not _is_pos_real(learning_rate):
        raise ValueError(
            f"learning_rate must be a positive finite number or a schedule, got "
            f"{learning_rate!r}."
        )
    if not (_is_real(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}.")
    if not (_is_real(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}.")
    if optimizer == "sgd":
        return optax.inject_hyperparams(_sgd, hyperparam_dtype=jnp.float32)(
            learning_rate, float(momentum), float(weight_decay))
    return optax.inject_hyperparams(_adam, static_args=("weight_decay",),
                                    hyperparam_dtype=jnp.float32)(
        learning_rate, float(weight_decay))


def init(params, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState`: ``params`` and ``optimizer.init(params)``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = init({"w": jnp.zeros(3)}, make_optimizer("adam", 1e-3))
      >>> s.params["w"].shape
      (3,)
    """
    return TrainState(params, optimizer.init(params))


def set_hyperparams(state: TrainState, **values) -> TrainState:
    """``state`` with hyperparameters replaced, e.g. ``learning_rate=0.001``.

    The names are those of ``state.opt_state.hyperparams`` (``'learning_rate'``; for SGD
    also ``'momentum'`` and ``'weight_decay'``). The step function is not recompiled.
    """
    hp = state.opt_state.hyperparams
    unknown = sorted(set(values) - set(hp))
    if unknown:
        raise ValueError(f"Unknown hyperparameter(s) {unknown}: this optimizer has "
                         f"{sorted(hp)}.")
    new = {**hp, **{k: jnp.asarray(v, hp[k].dtype) for k, v in values.items()}}
    return TrainState(state.params, state.opt_state._replace(hyperparams=new))


def momentum(state: TrainState):
    """SGD's momentum buffer (a pytree like the parameters) in ``state``."""
    return optax.tree_utils.tree_get(state.opt_state, "trace")


def with_momentum(state: TrainState, buf) -> TrainState:
    """``state`` with SGD's momentum buffer set to ``buf`` (e.g. restored from a file)."""
    buf = jax.tree_util.tree_map(lambda b, p: jnp.asarray(b, jnp.asarray(p).dtype), buf,
                                 state.params)
    return TrainState(state.params, optax.tree_utils.tree_set(state.opt_state, trace=buf))


def loss_fn(kind: str) -> Callable:
    """``loss(out, y) -> (loss, labels)``: the training loss and the classes ``y`` means.

    * ``'mse'``: ``0.5 * mean_i sum_c (out_ic - y_ic)^2``; classes ``argmax(y)``.
    * ``'xent'``: softmax cross-entropy ``-mean_i log softmax(out_i)[y_i]`` on integer
      classes ``y`` (B,), or on ``argmax(y)`` for (B, C) label vectors.
    * ``'soft_xent'``: cross-entropy with the rows of ``y`` as target distributions.
    * ``'logit_xent'``: cross-entropy with ``softmax(y)`` as the targets (DATM's soft
      label logits).

    Example:
      >>> import jax.numpy as jnp
      >>> loss, labels = loss_fn("xent")(jnp.zeros((2, 4)), jnp.array([1, 3]))
      >>> round(float(loss), 4), labels.tolist()
      (1.3863, [1, 3])
    """
    if kind not in STEP_LOSSES:
        raise ValueError(f"Unknown loss {kind!r}: use one of {list(STEP_LOSSES)}.")

    def loss(out, y):
        if kind == "mse":
            return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1)), jnp.argmax(y, axis=-1)
        logp = jax.nn.log_softmax(out, axis=-1)
        if kind == "xent":
            labels = jnp.argmax(y, axis=-1) if y.ndim == 2 else y
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1)), labels
        target = y if kind == "soft_xent" else jax.nn.softmax(y, axis=-1)
        return jnp.mean(jnp.sum(-logp * target, axis=-1)), jnp.argmax(y, axis=-1)

    return loss


def make_step(
    apply_fn: Callable,
    loss: str,
    optimizer: optax.GradientTransformation,
    *,
    augment: str = "none",
    subsample: int | None = None,
) -> Callable:
    """One jit-compiled training step of the finite-network trainer.

    The returned ``step(state, x, y, key, i, idx=None, f0=None)`` takes the minibatch
    ``x[idx], y[idx]`` (``idx`` None: all of ``x``; with ``subsample``, ``subsample``
    distinct rows drawn by ``jax.random.choice(fold_in(key, i), ...)``), augments it
    with DSA (:func:`kipnb.augment.augment` with key ``fold_in(key, i)``) unless
    ``augment='none'``, computes ``out = apply_fn(params, x) - f0`` (``f0``: the initial
    network's outputs on ``x`` for a centered network; None: ``apply_fn(params, x)``),
    and applies one optimizer update on the gradient of ``loss``. It returns
    ``(state, loss, correct)``: the new :class:`TrainState`, the batch loss and the
    number of rows whose ``argmax(out)`` is their class (device scalars; nothing is
    synced). Shardings of the inputs (:mod:`kipnb.shard`) are kept by ``jax.jit``.

    The step works with the state of any optimizer of the same kind from
    :func:`make_optimizer`: the hyperparameters are read from the state.

    Args:
      apply_fn: ``(params, x) -> outputs (B, C)``.
      loss: one of :data:`STEP_LOSSES` (see :func:`loss_fn`).
      optimizer: from :func:`make_optimizer`.
      augment: a DSA strategy, or ``'none'``.
      subsample: rows per step drawn at random (None: ``idx`` or all rows).

    Returns:
      The jitted step function.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> opt = make_optimizer("sgd", 0.5)
      >>> step = make_step(lambda p, x: x @ p["w"], "mse", opt)
      >>> s = init({"w": jnp.zeros((2, 2))}, opt)
      >>> x, y = jnp.eye(2), jnp.eye(2)
      >>> for i in range(20):
      ...     s, value, correct = step(s, x, y, jax.random.PRNGKey(0), i)
      >>> float(value) < 1e-4, int(correct)
      (True, 2)
    """
    loss_of = loss_fn(loss)  # an unknown DSA strategy is named by augment at the first step
    if subsample is not None and not (_is_int(subsample) and subsample >= 1):
        raise ValueError(f"subsample must be a positive integer or None, got {subsample!r}.")

    @jax.jit
    def step(state: TrainState, x, y, key, i, idx=None, f0=None):
        n = x.shape[0]
        step_key = jax.random.fold_in(key, i)
        if idx is None and subsample is not None and subsample < n:
            idx = jax.random.choice(step_key, n, (subsample,), replace=False)
            step_key = jax.random.fold_in(step_key, 1)
        if idx is not None:
            x, y = jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)
            f0 = None if f0 is None else jnp.take(f0, idx, axis=0)
        if augment != "none":
            x = augment_lib.augment(step_key, x, augment, augment_lib.DSAParams())

        def objective(params):
            out = apply_fn(params, x)
            if f0 is not None:
                out = out - f0
            value, labels = loss_of(out, y)
            return value, jnp.sum(jnp.argmax(out, axis=-1) == labels)

        (value, correct), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), value, correct

    return step


def epoch(step: Callable, state: TrainState, x, y, perm, key, *, batch_size: int):
    """One pass over the rows ``perm`` of ``(x, y)`` in minibatches of ``batch_size``.

    Step ``s`` of the epoch trains on ``perm[s * batch_size:(s + 1) * batch_size]`` (the
    last batch may be smaller) with key ``fold_in(key, s)`` (:func:`make_step`). Steps
    are dispatched asynchronously; nothing is synced.

    Returns:
      ``(state, losses, correct, sizes)``: the new state, lists of the per-step losses
      and correct counts (device scalars) and the batch sizes (ints).
    """
    losses, correct, sizes = [], [], []
    for s, start in enumerate(range(0, len(perm), batch_size)):
        idx = perm[start:start + batch_size]
        state, value, c = step(state, x, y, key, s, idx)
        losses.append(value)
        correct.append(c)
        sizes.append(len(idx))
    return state, losses, correct, sizes


@dataclass(frozen=True, eq=False)
class _Trainer:
    init_fn: Any
    opt: Any
    net: Any  # jitted (params, x) -> outputs
    step: Any  # make_step(...): (state, x, y, key, i, None, f0) -> state, loss, correct
    loss: Any  # jitted (params, x, y, f0) -> loss
    predict: Any  # jitted (params, params0, xb) -> argmax classes (centered if configured)


def _step_loss(config: TrainConfig) -> str:
    if config.loss == "mse":
        return "mse"
    return "soft_xent" if config.soft_xent else "xent"


@functools.lru_cache(maxsize=16)
def _trainer(config: TrainConfig, num_classes: int) -> _Trainer:
    """Network, optimizer and jitted functions for ``config`` (seeds and eval ignored).

    Cached so that the seeds of :func:`transfer` (and repeated calls) reuse the compiled
    code; jit compiles once per input shape.
    """
    init_fn, apply_fn, _ = archs.get(
        config.arch,
        depth=config.resolved_depth,
        width=config.resolved_width,
        num_classes=num_classes,
    )
    opt = make_optimizer(config)
    loss_of = loss_fn(_step_loss(config))

    def net(params, x):
        return apply_fn(params, x)

    def objective(params, x, y, f0):
        # f0: the initial network's outputs on x when centering, else zeros.
        return loss_of(net(params, x) - f0, y)[0]

    @jax.jit
    def predict(params, params0, xb):
        out = net(params, xb)
        if config.center:
            out = out - net(params0, xb)
        return jnp.argmax(out, axis=-1)

    step = make_step(net, _step_loss(config), opt, subsample=config.batch_size)
    return _Trainer(init_fn, opt, jax.jit(net), step, jax.jit(objective), predict)


def _place(x: np.ndarray, m=None) -> jax.Array:
    """``x`` split over the devices along its first axis if it divides, else replicated."""
    m = shard.mesh() if m is None else m
    if x.shape[0] % shard.device_count(m) == 0:
        return shard.shard_batch(x, m)
    return shard.replicate(x, m)


def _accuracy(trainer: _Trainer, params, params0, x: np.ndarray, labels: np.ndarray,
              block: int) -> float:
    """Fraction correct, evaluated in padded blocks of ``block`` rows (one compilation)."""
    n = x.shape[0]
    block = min(block, n)
    correct = 0
    for start in range(0, n, block):
        xb = x[start:start + block]
        m = xb.shape[0]
        if m < block:  # pad to the block size so every block reuses the compiled code
            xb = np.concatenate([xb, np.zeros((block - m, *x.shape[1:]), x.dtype)])
        pred = np.asarray(trainer.predict(params, params0, _place(np.asarray(xb, np.float32))))
        correct += int((pred[:m] == labels[start:start + m]).sum())
    return correct / n


def _boundaries(steps: int, eval_every: int | None) -> list[int]:
    """Step counts at which a chunk ends: every _CHUNK steps, every eval, and the end."""
    marks = set(range(_CHUNK, steps, _CHUNK)) | {steps}
    if eval_every is not None:
        marks |= set(range(eval_every, steps, eval_every))
    return sorted(marks)


def train_network(
    config: TrainConfig,
    x_train,
    y_train,
    x_test,
    labels_test,
    *,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train one finite network on ``(x_train, y_train)`` and evaluate it on the test set.

    Args:
      config: a :class:`TrainConfig`.
      x_train: support images (n, H, W, C).
      y_train: support labels (n, C) -- centered one-hot, soft or learned real-valued
        labels, used as given by ``loss='mse'`` -- or (n,) integer classes (made centered
        one-hot). The network has ``C`` outputs.
      x_test: test images (n_t, H, W, C), preprocessed like ``x_train``.
      labels_test: (n_t,) integer classes, or (n_t, C) label vectors (argmax).
      seed: initializes the network with ``jax.random.PRNGKey(seed)``; minibatches (if
        any) are drawn from ``jax.random.fold_in(PRNGKey(seed), 1)``.
      progress: show a tqdm progress bar over the steps.

    Returns:
      ``dict(test_acc, train_acc, final_loss, history, train_outputs, params,
      init_params, seed, steps)``: ``test_acc`` is the final test accuracy (a fraction
      in [0, 1]; no selection over evaluations), ``train_acc`` the accuracy on the
      support set against ``argmax(y_train)``, ``final_loss`` the full-support-set
      training loss of the final network, ``history`` a dict of lists ``step``,
      ``test_acc``, ``train_acc``, ``loss`` (step 0 and every ``eval_every`` steps when
      set, and always the last step), ``train_outputs`` the final (centered, if
      ``config.center``) outputs on the support set (n, C) as NumPy, ``params`` and
      ``init_params`` the trained and initial parameters (JAX pytrees for
      ``archs.get(...)``'s ``apply_fn``; a centered network predicts
      ``apply_fn(params, x) - apply_fn(init_params, x)``). Drop the last three before
      writing JSON.

    Raises:
      ValueError: malformed or non-finite inputs (the message names the fix).
      FloatingPointError: the training loss became NaN/Inf (names the step; lower the
        learning rate).
    """
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    x_train, y_train, x_test, labels = _validate(config, x_train, y_train, x_test, labels_test)
    num_classes = y_train.shape[1]
    trainer = _trainer(
        dataclasses.replace(config, seeds=(0,), eval_every=None, eval_batch_size=1), num_classes
    )

    key = jax.random.PRNGKey(int(seed))
    _, params = trainer.init_fn(key, (-1, *x_train.shape[1:]))
    # Devices (kipnb.shard): parameters replicated, the training batch split over all
    # devices when its size allows (else replicated; same result), so jit partitions it.
    m = shard.mesh()
    params = shard.replicate(jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32),
                                                    params), m)
    params0 = params
    state = init(params, trainer.opt)
    batch_key = jax.random.fold_in(key, 1)
    x = _place(np.asarray(x_train, np.float32), m)
    y = _place(np.asarray(y_train, np.float32), m)
    f0 = trainer.net(params0, x) if config.center else jnp.zeros_like(y)
    x_test = np.asarray(x_test, np.float32)
    train_labels = y_train.argmax(axis=1)
    block = config.eval_batch_size

    history: dict[str, list] = {"step": [], "test_acc": [], "train_acc": [], "loss": []}

    def evaluate(step: int) -> None:
        history["step"].append(step)
        history["test_acc"].append(_accuracy(trainer, params, params0, x_test, labels, block))
        history["train_acc"].append(
            _accuracy(trainer, params, params0, x_train, train_labels, block)
        )
        history["loss"].append(float(trainer.loss(params, x, y, f0)))

    if config.eval_every is not None:
        evaluate(0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=f"train {config.arch} seed {seed}")
    done = 0
    try:
        for stop in _boundaries(config.steps, config.eval_every):
            losses = []
            for i in range(done, stop):  # dispatched asynchronously; synced once per chunk
                state, value, _ = trainer.step(state, x, y, batch_key, i, None, f0)
                losses.append(value)
            params = state.params
            losses = np.asarray(jax.device_get(losses))
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                raise FloatingPointError(
                    f"The training loss became {losses[bad[0]]} at step {done + int(bad[0]) + 1}"
                    f" of {config.steps} ({config.optimizer}, learning_rate="
                    f"{config.learning_rate:g}): training diverged. Lower the learning_rate "
                    f"(e.g. {config.learning_rate / 10:g}), and check the scale of the images "
                    f"and labels."
                )
            if bar is not None:
                bar.update(stop - done)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
            done = stop
            if stop == config.steps or (
                config.eval_every is not None and stop % config.eval_every == 0
            ):
                evaluate(stop)
    finally:
        if bar is not None:
            bar.close()

    outputs = trainer.net(params, x) - f0
    return {
        "test_acc": history["test_acc"][-1],
        "train_acc": history["train_acc"][-1],
        "final_loss": history["loss"][-1],
        "history": history,
        "train_outputs": np.asarray(outputs),
        "params": params,
        "init_params": params0,
        "seed": int(seed),
        "steps": config.steps,
    }


def transfer(
    distilled_or_xy,
    x_test,
    labels_test,
    config: TrainConfig | None = None,
    *,
    progress: bool = False,
) -> dict:
    """Train one network per seed of ``config.seeds`` on a support set; test accuracies.

    Args:
      distilled_or_xy: a tuple ``(images, labels)`` of arrays in the test images'
        space, labels ``(n, C)`` (used as given) or ``(n,)`` integer classes. For a
        :class:`~kipnb.DistilledSet` use :func:`kipnb.evaluate.network`, which brings
        it into the data's space and converts its labels by their kind.
      x_test, labels_test: test images (n_t, H, W, C) preprocessed like the support
        images, and their (n_t,) integer classes (or (n_t, C) label vectors).
      config: a :class:`TrainConfig`; None: the defaults.
      progress: show a tqdm progress bar over the seeds.

    Returns:
      ``dict(mean, std, accs, seeds, runs, config)``: ``accs`` are the final test
      accuracies (fractions in [0, 1]) in the order of ``seeds``; ``mean`` and ``std``
      are ``np.mean(accs)`` and ``np.std(accs)`` (population std, ``ddof=0``); ``runs``
      the per-seed results of :func:`train_network` without ``params`` (JSON-able);
      ``config`` is ``dataclasses.asdict(config)``.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}.")
    if isinstance(distilled_or_xy, DistilledSet):
        raise TypeError(
            "train.transfer trains on arrays (images, labels) already in the test data's space; "
            "judge a DistilledSet with kipnb.evaluate.network(ds, data, protocol='kip_transfer'), "
            "which converts its space and label kind."
        )
    if isinstance(distilled_or_xy, tuple | list) and len(distilled_or_xy) == 2:
        images, labels = distilled_or_xy
    else:
        raise ValueError(
            f"transfer needs a tuple (images, labels) of arrays, got "
            f"{type(distilled_or_xy).__name__}."
        )
    seeds = config.seeds
    if progress:
        from tqdm.auto import tqdm

        seeds = tqdm(seeds, desc=f"transfer {config.arch}")
    runs = []
    for seed in seeds:
        run = train_network(config, images, labels, x_test, labels_test, seed=seed)
        for k in ("params", "init_params", "train_outputs"):
            run.pop(k)
        runs.append(run)
    accs = [r["test_acc"] for r in runs]
    return {
        "mean": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "accs": accs,
        "seeds": list(config.seeds),
        "runs": runs,
        "config": dataclasses.asdict(config),
    }
