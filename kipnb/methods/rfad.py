r"""RFAD: KIP with a random-feature ConvNet NNGP and a Platt-scaled cross-entropy loss.

Loo, Hasani, Amini, Rus, "Efficient Dataset Distillation using Random Feature
Approximation" (NeurIPS 2022; code: github.com/yolky/RFAD). KIP's outer loop (KRR from a
learned support set onto a batch of real targets, gradient descent on the support set),
with the exact ConvNet kernel replaced by an unbiased Monte-Carlo estimate that costs
O(n) instead of O(n^2) kernel evaluations:

* **Random features.** Every step draws ``n_models`` fresh random ConvNets
  (:class:`kipnb.nets.ConvNet`, no normalization, ``depth`` blocks of 3x3 conv - ReLU -
  2x2 avgpool, ``width`` channels; Gaussian weights ``N(0, W_std^2 / fan_in)``, biases
  ``N(0, b_std^2)``) and takes the flattened output of their last block,
  ``phi_m(x)`` of dimension ``D``. With ``F = [phi_1, ..., phi_M] / sqrt(M D)``,

      K_rf(x, x') = W_std^2 F(x) . F(x') + b_std^2

  is an unbiased estimate of the NNGP of the same ConvNet at infinite width with a Dense
  readout (``kipnb.archs.convnet(depth, W_std, b_std)``, ``get='nngp'``); its error
  shrinks like ``1 / sqrt(M * width)`` (:func:`random_feature_kernel`; checked against
  ``kipnb.stax`` in ``tests/test_rfad.py`` and notebook ``04b``).
* **Platt scaling.** KRR's predictions ``pred`` are read as logits with a learned
  temperature, ``loss = CE(softmax(exp(log_temp) * pred), class)`` (``loss='platt'``,
  the paper's choice for classification), or KIP's ``0.5 * mean (pred - y)^2``
  (``loss='mse'``).
* **Learned labels.** The support labels start as one-hot minus 1/C and are learned with
  the images (``learn_labels``); the set is saved with ``label_kind='regression'``.
* **KRR.** ``pred = K_ts (K_ss + reg * tr(K_ss)/n * I)^{-1} Y_s`` (RFAD's ``jit``).
* **Optimizer.** AdaBelief (as RFAD's code), ``learning_rate`` for the images and
  labels and ``temp_learning_rate`` for ``log_temp``.

The reference code's defaults (``run_distillation.py``): ``n_models=8``, ``width=256``
(ConvNet_wide, k=2 x 128), depth 3, no norm, 4 x 1280 = 5120 targets per step, lr 1e-3
(temperature 1e-2), ``jit=5e-3``, AdaBelief(eps=1e-16), up to 100 000 steps with early
stopping on a validation loss: :data:`PARAMETER_SETS` ``['paper']``. The class
defaults are sized for a laptop CPU (width 64, 4 models, 1000 targets).

Usage::

    cfg = RFADConfig(dataset="fashion_mnist", ipc=10, steps=300)
    res = run(cfg, checkpoint_dir="build/rfad")     # resumes if killed
    evaluate.krr(res.distilled, d, kernel="conv", get="nngp")

Step functions: ``state = init(cfg, d)``; ``state, info = update(state, cfg, d)``;
``run`` puts :func:`kipnb.loop.run` around them (checkpoints, exact resume, the NaN
stop, history, progress and a callback; :func:`run_loop`, shared with :mod:`kipnb.frepo`).

Determinism: the random networks of step ``s`` come from
``jax.random.fold_in(key(seed), s)`` and its targets from
``numpy.random.default_rng([seed, s])``, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.linalg import cho_factor, cho_solve

from kipnb import checkpoint, checks, kip, krr, loop, nets, preprocess
from kipnb.checkpoint import CheckpointError
from kipnb.distilled import DistilledSet

__all__ = [
    "PARAMETER_SETS",
    "CheckpointError",
    "RFADConfig",
    "RFADNumericalError",
    "RFADResult",
    "RandomFeatureEvaluator",
    "check_data",
    "exact_nngp_kernel",
    "init",
    "random_feature_kernel",
    "random_features",
    "rfad_loss",
    "run",
    "run_loop",
    "step_key",
    "target_indices",
    "update",
]

CHECKPOINT_NAME = "rfad_checkpoint.npz"
HIGHEST = jax.lax.Precision.HIGHEST
LOSSES = ("platt", "mse")
#: Config fields a resumed run may change.
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every", "eval_every", "eval_test_size"})


class RFADNumericalError(krr.NumericalError):
    """The RFAD loss or its gradient became NaN/Inf."""


@dataclass(frozen=True)
class RFADConfig:
    """Everything that determines an RFAD run (frozen; ``dataclasses.replace`` to vary).

    Attributes:
        dataset: a :mod:`kipnb.data` name.
        ipc: support images per class.
        steps: optimizer steps.
        n_models: random ConvNets drawn afresh every step (paper: 8).
        width, depth: their channels and conv blocks (paper: 256, 3).
        W_std, b_std: their Gaussian weight / bias scales (the NNGP they estimate).
        target_batch_size: real targets per step, class balanced (paper: 5120).
        loss: ``'platt'`` (cross-entropy on temperature-scaled KRR outputs) or ``'mse'``.
        learning_rate: AdaBelief's rate for images and labels (paper: 1e-3).
        temp_learning_rate: for the log temperature of the Platt loss (paper: 1e-2).
        learn_labels: learn the support labels too.
        reg: KRR's relative ridge (RFAD's ``jit``, paper 5e-3).
        preprocessing, zca_reg: :func:`kipnb.preprocess.make` method and ZCA strength.
        init: ``'real'`` (class-balanced random training images) or ``'noise'``.
        seed: initialization, random networks and target batches.
        eval_every: KRR test accuracy with ``eval_models`` fixed random nets (0: never).
        eval_models: random nets of the running evaluation (fixed for the whole run).
        eval_test_size: test images of the running evaluation.
        checkpoint_every: steps between checkpoints (when a ``checkpoint_dir`` is given).
    """

    dataset: str = "fashion_mnist"
    ipc: int = 10
    steps: int = 300
    n_models: int = 4
    width: int = 64
    depth: int = 3
    W_std: float = math.sqrt(2.0)
    b_std: float = 0.1
    target_batch_size: int = 1000
    loss: str = "platt"
    learning_rate: float = 1e-3
    temp_learning_rate: float = 1e-2
    learn_labels: bool = True
    reg: float = 5e-3
    preprocessing: str = "standardize"
    zca_reg: float = 0.1
    init: str = "real"
    seed: int = 0
    eval_every: int = 50
    eval_models: int = 4
    eval_test_size: int = 2000
    checkpoint_every: int = 50

    def __post_init__(self):
        checks.int_fields(self, (("ipc", 1), ("steps", 0), ("n_models", 1), ("width", 1),
                                 ("depth", 1), ("target_batch_size", 1), ("eval_every", 0),
                                 ("eval_models", 1), ("eval_test_size", 1),
                                 ("checkpoint_every", 0), ("seed", 0)))
        for name in ("learning_rate", "temp_learning_rate", "reg", "W_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RFADConfig.{name}={getattr(self, name)!r}: must be positive.")
        if not self.b_std >= 0:
            raise ValueError(f"RFADConfig.b_std={self.b_std!r}: must be >= 0.")
        if self.loss not in LOSSES:
            raise ValueError(f"RFADConfig.loss={self.loss!r}: use one of {list(LOSSES)}.")
        if self.preprocessing not in preprocess.METHODS:
            raise ValueError(f"RFADConfig.preprocessing={self.preprocessing!r}: use one of "
                             f"{', '.join(preprocess.METHODS)}.")
        if self.init not in ("real", "noise"):
            raise ValueError(f"RFADConfig.init={self.init!r}: use 'real' or 'noise'.")

    @property
    def net(self) -> nets.ConvNet:
        """The random feature network (its ``head`` is never used)."""
        return nets.ConvNet(width=self.width, depth=self.depth, norm="none", num_classes=1)


#: Named settings. ``'paper'``: the reference code's defaults (GPU-sized).
PARAMETER_SETS: dict[str, RFADConfig] = {
    "paper": RFADConfig(n_models=8, width=256, target_batch_size=5120, steps=20000,
                        eval_models=16, eval_every=200),
    "cpu": RFADConfig(),
}


@dataclass(frozen=True, eq=False)
class RFADResult:
    """What :func:`run` returns: the distilled set, the history and the final state."""

    distilled: DistilledSet
    history: dict
    config: RFADConfig
    state: dict = field(default_factory=dict)


# ------------------------------------------------------------------ random features


def _gaussian_params(key, net: nets.ConvNet, input_shape, W_std, b_std, dtype=jnp.float32):
    """ConvNet parameters with weights N(0, W_std^2 / fan_in) and biases N(0, b_std^2)."""
    template = net.init(jax.random.key(0), input_shape, dtype)
    template = {k: v for k, v in template.items() if k != "head"}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, (path, leaf) in zip(keys, leaves, strict=True):
        name = path[-1].key
        if name == "w":  # HWIO
            fan_in = leaf.shape[0] * leaf.shape[1] * leaf.shape[2]
            out.append(jax.random.normal(k, leaf.shape, dtype) * (W_std / math.sqrt(fan_in)))
        else:
            out.append(jax.random.normal(k, leaf.shape, dtype) * b_std)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), out)


@functools.partial(jax.jit, static_argnames=("n_models", "width", "depth", "W_std", "b_std"))
def random_features(key, x, n_models: int, *, width: int = 64, depth: int = 3,
                    W_std: float = math.sqrt(2.0), b_std: float = 0.1) -> jax.Array:
    """Features ``F (N, n_models * D)`` of ``n_models`` random ConvNets drawn from ``key``.

    Each network is a :class:`kipnb.nets.ConvNet` (``norm='none'``) with Gaussian
    weights; ``phi_m`` is its last block's flattened output (dimension ``D``), and
    ``F = [phi_1 .. phi_M] / sqrt(M D)``, so that ``W_std^2 F F^T + b_std^2`` estimates
    the ConvNet's NNGP (:func:`random_feature_kernel`). The same ``key`` gives the same
    networks for any ``x``.

    Args:
        key: a ``jax.random.key``.
        x: NHWC images ``(N, H, W, C)``.
        n_models: number of random networks.
        width, depth, W_std, b_std: the networks (see :class:`RFADConfig`).

    Returns:
        ``(N, n_models * D)`` float array.

    Example:
        >>> f = random_features(jax.random.key(0), jnp.ones((2, 8, 8, 1)), 3, width=8)
        >>> f.shape
        (2, 24)
    """
    x = jnp.asarray(x)
    net = nets.ConvNet(width=width, depth=depth, norm="none", num_classes=1)
    shape = x.shape[1:]
    params = jax.vmap(lambda k: _gaussian_params(k, net, shape, W_std, b_std, x.dtype))(
        jax.random.split(key, n_models))
    feats = jax.vmap(lambda p: net.features(p, x))(params)  # (M, N, D)
    m, n, d = feats.shape
    return jnp.transpose(feats, (1, 0, 2)).reshape(n, m * d) / jnp.sqrt(float(m * d))


def random_feature_kernel(f1, f2=None, *, W_std: float = math.sqrt(2.0),
                          b_std: float = 0.1) -> jax.Array:
    """``W_std^2 f1 f2^T + b_std^2``: the random-feature NNGP from :func:`random_features`.

    Example:
        >>> f = jnp.eye(2)
        >>> random_feature_kernel(f, W_std=1.0, b_std=0.0).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    f2 = f1 if f2 is None else f2
    return W_std ** 2 * jnp.matmul(f1, f2.T, precision=HIGHEST) + b_std ** 2


def rfad_loss(f_s, y_s, f_t, t_classes, log_temp, *, loss: str = "platt", reg: float = 5e-3,
              W_std: float = math.sqrt(2.0), b_std: float = 0.1):
    """RFAD's loss and batch accuracy from random features: ``(loss, acc)``.

    ``pred = K_ts (K_ss + reg tr(K_ss)/n I)^{-1} y_s`` with :func:`random_feature_kernel`;
    ``'platt'``: mean cross-entropy of ``softmax(exp(log_temp) * pred)`` against
    ``t_classes``; ``'mse'``: ``0.5 * mean (pred - (onehot - 1/C))^2``.
    """
    k_ss = random_feature_kernel(f_s, W_std=W_std, b_std=b_std)
    k_ts = random_feature_kernel(f_t, f_s, W_std=W_std, b_std=b_std)
    lower, _ = cho_factor(krr.regularized(k_ss, reg), lower=True)
    pred = jnp.matmul(k_ts, cho_solve((lower, True), y_s), precision=HIGHEST)
    c = y_s.shape[1]
    if loss == "platt":
        logp = jax.nn.log_softmax(jnp.exp(log_temp) * pred, axis=1)
        value = -jnp.mean(jnp.take_along_axis(logp, t_classes[:, None], axis=1))
    else:
        y_t = jax.nn.one_hot(t_classes, c, dtype=pred.dtype) - 1.0 / c
        value = 0.5 * jnp.mean((pred - y_t) ** 2)
    acc = jnp.mean(jnp.argmax(pred, 1) == t_classes)
    return value, acc


# ---------------------------------------------------------------------- step functions


def _optimizer(config: RFADConfig):
    opt = optax.multi_transform(
        {"main": optax.adabelief(config.learning_rate, eps=1e-16),
         "temp": optax.adabelief(config.temp_learning_rate, eps=1e-16),
         "frozen": optax.set_to_zero()},
        {"images": "main", "labels": "main" if config.learn_labels else "frozen",
         "log_temp": "temp" if config.loss == "platt" else "frozen"},
    )
    return opt


def step_key(config):
    """``config`` with the fields that do not change a step's computation normalized
    (steps, evaluation, checkpoints): the key of the compiled-step cache."""
    return dataclasses.replace(config, steps=0, eval_every=0, eval_test_size=1,
                               eval_models=1, checkpoint_every=0)


def _step_fn(config: RFADConfig):
    return _compiled_step(step_key(config))


@functools.lru_cache(maxsize=16)
def _compiled_step(config: RFADConfig):
    opt = _optimizer(config)
    kw = dict(width=config.width, depth=config.depth, W_std=config.W_std, b_std=config.b_std)

    @jax.jit
    def step(params, opt_state, x_t, t_classes, key):
        f_t = jax.lax.stop_gradient(random_features(key, x_t, config.n_models, **kw))

        def loss_fn(p):
            f_s = random_features(key, p["images"], config.n_models, **kw)
            return rfad_loss(f_s, p["labels"], f_t, t_classes, p["log_temp"],
                             loss=config.loss, reg=config.reg, W_std=config.W_std,
                             b_std=config.b_std)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, new_state = opt.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        return new, new_state, loss, acc, finite

    return step


def target_indices(seed: int, step: int, labels: np.ndarray, batch_size: int,
                   num_classes: int) -> np.ndarray:
    """The class-balanced real targets of ``step``: a function of (seed, step) only."""
    n = len(labels)
    if batch_size >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, step])
    per = max(1, batch_size // num_classes)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        out.append(idx if per >= len(idx) else rng.choice(idx, per, replace=False))
    return np.concatenate(out)


def init(config: RFADConfig, d) -> dict:
    """The starting state: ``params`` (images, labels, log_temp), ``opt_state``, ``step``.

    Args:
        config: the :class:`RFADConfig`.
        d: prepared data (:func:`kipnb.kip.prepare`).

    Returns:
        A dict pytree of arrays (what :func:`update` advances and checkpoints hold).
    """
    kcfg = kip.KIPConfig(dataset=config.dataset, ipc=config.ipc, init=config.init,
                         seed=config.seed, preprocessing=config.preprocessing)
    support = kip.init_support(kcfg, d)
    params = {"images": support["images"], "labels": support["labels"],
              "log_temp": jnp.zeros((), jnp.float32)}
    return {"params": params, "opt_state": _optimizer(config).init(params),
            "step": jnp.zeros((), jnp.int32)}


def update(state: dict, config: RFADConfig, d) -> tuple[dict, dict]:
    """One RFAD step: fresh random nets, a target batch, an AdaBelief update.

    Args:
        state: from :func:`init` or a previous :func:`update`.
        config: the :class:`RFADConfig`.
        d: prepared data.

    Returns:
        ``(new_state, info)``; ``info`` has ``step`` (after the update), ``loss``,
        ``batch_acc``, ``finite``. When ``finite`` is False the state is returned
        unchanged (the caller decides; :func:`run` stops with :class:`RFADNumericalError`).
    """
    s = int(state["step"])
    idx = target_indices(config.seed, s, d.labels_train, config.target_batch_size,
                         d.num_classes)
    key = jax.random.fold_in(jax.random.key(config.seed), s)
    new, new_opt, loss, acc, finite = _step_fn(config)(
        state["params"], state["opt_state"], jnp.asarray(d.x_train[idx]),
        jnp.asarray(d.labels_train[idx], jnp.int32), key)
    info = {"step": s + 1, "loss": float(loss), "batch_acc": float(acc),
            "finite": bool(finite)}
    if not info["finite"]:
        return state, info
    return {"params": new, "opt_state": new_opt, "step": jnp.asarray(s + 1, jnp.int32)}, info


class RandomFeatureEvaluator:
    """The running evaluation: KRR test accuracy with fixed random ConvNets.

    ``config.eval_models`` networks drawn once from ``key(2**31 - 1 - seed)``, their
    features of the first ``config.eval_test_size`` test images computed once; calling
    it with ``dict(images=..., labels=...)`` (model space) gives the test accuracy.
    """

    def __init__(self, config: RFADConfig, d):
        n = min(config.eval_test_size, len(d.x_test))
        self.key = jax.random.key(2**31 - 1 - config.seed)
        self.kw = dict(width=config.width, depth=config.depth, W_std=config.W_std,
                       b_std=config.b_std)
        self.config = config
        feats = [random_features(self.key, jnp.asarray(d.x_test[i:min(i + 500, n)]),
                                 config.eval_models, **self.kw) for i in range(0, n, 500)]
        self.f_test = jnp.concatenate(feats)
        self.y_test = np.asarray(d.labels_test[:n])

    def __call__(self, params) -> float:
        f_s = random_features(self.key, params["images"], self.config.eval_models, **self.kw)
        k_ss = random_feature_kernel(f_s, W_std=self.config.W_std, b_std=self.config.b_std)
        k_ts = random_feature_kernel(self.f_test, f_s, W_std=self.config.W_std,
                                     b_std=self.config.b_std)
        pred = krr.krr(k_ss, k_ts, params["labels"], reg=self.config.reg)
        return float(np.mean(np.asarray(pred).argmax(1) == self.y_test))


def _empty_history() -> dict:
    return {"step": [], "loss": [], "batch_acc": [], "eval_step": [], "test_acc": [],
            "wall_time": []}


def check_data(config, d=None, data_dir=None):
    """The prepared data of an RFAD / FRePo ``config``: ``d`` checked, or loaded.

    Args:
        config: an :class:`RFADConfig` or :class:`kipnb.frepo.FRePoConfig`.
        d: prepared data (:func:`kipnb.kip.prepare`), or None to prepare them from
            ``config`` (``dataset``, ``preprocessing``, ``zca_reg``).
        data_dir: where to look for the dataset files (when ``d`` is None).

    Returns:
        The prepared data.

    Raises:
        ValueError: ``d`` holds another dataset than ``config.dataset``.

    Example:
        >>> check_data(RFADConfig(dataset="digits")).dataset
        'digits'
    """
    if d is None:
        d = kip.prepare(kip.KIPConfig(dataset=config.dataset,
                                      preprocessing=config.preprocessing,
                                      zca_reg=config.zca_reg), data_dir=data_dir)
    if d.dataset != config.dataset:
        raise ValueError(f"The data are {d.dataset!r} but config.dataset is "
                         f"{config.dataset!r}: prepare the data for this config.")
    return d


def run_loop(what: str, config, d, state: dict, update_fn: Callable, *, history: dict,
             checkpoint_path, evaluate: Callable[[dict], float] | None,
             nan_error: Callable[[int, dict, str], Exception],
             callback: Callable[[dict], Any] | None, progress: bool,
             free=RESUMABLE_CHANGES) -> loop.LoopResult:
    """:func:`kipnb.loop.run` set up for a support-set method (RFAD, FRePo).

    ``update_fn(state, config, d) -> (state, info)`` is the method's :func:`update`: its
    ``state['step']`` counts the steps, so the batch of a step is a function of the
    state and a resumed run equals an uninterrupted one. Evaluation at the start, every
    ``config.eval_every`` steps and at the end (``history['test_acc']``); checkpoints
    every ``config.checkpoint_every`` steps and at the end; resume checked against
    ``checkpoint.resumable_config(config)`` (up to ``free``) and ``d.fingerprint()``.

    Args:
        what: the method's name in messages and on the progress bar ("RFAD").
        config: the method's frozen config dataclass.
        d: the prepared data.
        state: the method's :func:`init` state (the template of a checkpoint's arrays).
        update_fn: the method's :func:`update`.
        history: the empty history (dict of lists; fixes the keys and their order).
        checkpoint_path: the checkpoint file, or None.
        evaluate: ``evaluate(params) -> test accuracy``, or None (no evaluation).
        nan_error: ``nan_error(step, metrics, kept)`` builds the error of a NaN step.
        callback: called after every step with ``step``, the step's metrics,
            ``test_acc`` on evaluation steps and ``last``; it may return
            :data:`kipnb.loop.STOP` to stop early (the state is checkpointed first).
        progress: a tqdm bar.
        free: config fields a resumed run may change.

    Returns:
        The :class:`kipnb.loop.LoopResult`.
    """
    def step(s, batch):
        new, info = update_fn(s, config, d)
        info = dict(info)
        info.pop("step")  # the loop counts the steps
        return new, info

    user_callback = callback
    if callback is not None:
        def callback(info):  # noqa: F811 (the user's callback without the state)
            return user_callback({k: v for k, v in info.items() if k != "state"})

    evaluating = evaluate is not None
    return loop.run(
        state, step, config.steps, history=history, step_key="step",
        evaluate=(lambda s, _step: {"test_acc": evaluate(s["params"])}) if evaluating else None,
        eval_every=config.eval_every, eval_at_start=evaluating, eval_at_end=evaluating,
        checkpoint_path=checkpoint_path, checkpoint_every=config.checkpoint_every,
        config=checkpoint.resumable_config(config), fingerprint=d.fingerprint(), free=free,
        what=what, unpack=lambda tree: jax.tree_util.tree_map(jnp.asarray, tree),
        nan_error=nan_error, callback=callback, progress_bar=progress, desc=what,
    )


def run(config: RFADConfig, d=None, *, checkpoint_dir=None,
        callback: Callable[[dict], Any] | None = None, progress: bool = True,
        data_dir=None) -> RFADResult:
    """Run RFAD: :func:`init`, then :func:`update` ``config.steps`` times.

    This is :func:`kipnb.loop.run` (checkpoints, exact resume, NaN stop, history,
    progress, callback) over the public step functions; a hand-written loop
    ``state = init(config, d)``, ``state, info = update(state, config, d)`` gives the
    same set.

    Args:
        config: the :class:`RFADConfig`.
        d: prepared data (:func:`kipnb.kip.prepare`; loaded from ``config`` if None).
        checkpoint_dir: ``rfad_checkpoint.npz`` is written there every
            ``checkpoint_every`` steps and at the end; a run of the same config finds it
            and resumes exactly (``steps`` etc. may change, :data:`RESUMABLE_CHANGES`).
        callback: called after every step with ``step``, ``loss``, ``batch_acc``,
            ``test_acc`` on evaluation steps and ``last`` (e.g. :class:`kipnb.viz.LivePlot`);
            returning :data:`kipnb.loop.STOP` stops the run (checkpointed first).
        progress: a tqdm bar.
        data_dir: where to look for the dataset files.

    Returns:
        :class:`RFADResult`: ``distilled`` (``label_kind='regression'``, the learned
        temperature in ``extra['temperature']``), ``history`` (``step``, ``loss``,
        ``batch_acc``; ``eval_step``, ``test_acc``, ``wall_time``; ``seconds``), the state.

    Raises:
        RFADNumericalError: the loss or gradient became NaN/Inf (the update is not
            applied; the last checkpoint is kept).
        CheckpointError: ``checkpoint_dir`` holds a checkpoint of another run.

    Example:
        >>> d = kip.prepare("digits")  # doctest: +SKIP
        >>> res = run(RFADConfig(dataset="digits", ipc=1, steps=20), d)  # doctest: +SKIP
        >>> res.distilled.label_kind  # doctest: +SKIP
        'regression'
    """
    if not isinstance(config, RFADConfig):
        raise TypeError(f"config must be an RFADConfig, got {type(config).__name__}.")
    d = check_data(config, d, data_dir)
    state = init(config, d)
    classes = np.asarray(state["params"]["labels"]).argmax(axis=1).astype(np.int32)

    def nan_error(step: int, metrics: dict, kept: str) -> Exception:
        return RFADNumericalError(
            f"RFAD step {step}: the loss or its gradient is NaN/Inf "
            f"(loss={metrics['loss']}); the update was not applied. {kept} Fixes: raise "
            f"reg (now {config.reg:g}), lower learning_rate (now "
            f"{config.learning_rate:g}) or temp_learning_rate (now "
            f"{config.temp_learning_rate:g}).")

    out = run_loop(
        "RFAD", config, d, state, update, history=_empty_history(),
        checkpoint_path=None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME,
        evaluate=RandomFeatureEvaluator(config, d) if config.eval_every else None,
        nan_error=nan_error, callback=callback, progress=progress)
    state, history = out.state, out.history
    p = {k: np.asarray(v) for k, v in state["params"].items()}
    distilled = DistilledSet(
        images=p["images"], labels=p["labels"], label_kind="regression",
        num_classes=d.num_classes, classes=classes, transform=d.transform,
        source={"method": "rfad",
                "learner": f"krr random-feature convnet{config.depth}-nngp "
                           f"({config.n_models} nets of width {config.width})",
                "config": dataclasses.asdict(config), "dataset": config.dataset,
                "ipc": config.ipc, "data_fingerprint": d.fingerprint(), "init": config.init},
        extra={"steps": int(state["step"]), "temperature": float(np.exp(p["log_temp"])),
               "test_acc": history["test_acc"][-1] if history["test_acc"] else None},
    )
    return RFADResult(distilled=distilled, history=history, config=config, state=state)


def exact_nngp_kernel(config: RFADConfig, num_classes: int = 10):
    """The exact infinite-width kernel that :func:`random_features` estimates.

    ``kipnb.archs.convnet(depth, W_std, b_std)``'s ``kernel_fn`` (call with
    ``get='nngp'``).
    """
    from kipnb import archs

    return archs.kernel("conv", num_classes=num_classes, depth=config.depth,
                        W_std=config.W_std, b_std=config.b_std)

