r"""FRePo: KRR on the features of a pool of ConvNets trained online on the distilled data.

Zhou, Nezhadarya, Ba, "Dataset Distillation using Neural Feature Regression" (NeurIPS
2022; code: github.com/yongchao97/FRePo, JAX). KIP's outer loop with the kernel taken
from *finite, partly trained* networks instead of the infinite-width limit:

* **Model pool.** ``pool_size`` ConvNets (:class:`kipnb.nets.ConvNet`) are kept. Each
  step picks one, ``i``, and uses its last-layer features ``phi_i`` (the flattened
  output of the last conv block, :meth:`kipnb.nets.ConvNet.features`).
* **Neural feature regression.** With ``K = phi_i(X) phi_i(X')^T`` (a linear kernel on
  the features),

      pred = K_ts (K_ss + reg * tr(K_ss)/n * I)^{-1} Y_s,
      loss = 0.5 * mean (pred - Y_t)^2       (Y_t one-hot minus 1/C)

  and Adam (or LAMB, as the reference code) moves the support images and labels down its
  gradient. The features of the targets are constants (``stop_gradient``): the
  meta-gradient goes through the kernel and one forward pass of the feature extractor,
  not through any training run.
* **Online training and resets.** After the support update, model ``i`` takes
  ``online_steps`` Adam steps on the distilled set (MSE of its logits to the learned
  labels). With ``norm='batchnorm'`` those steps normalize with the distilled batch's
  statistics and update the model's running statistics (decay 0.1, as FRePo's ``Conv``),
  and the KRR features of support and targets use the running statistics, as the
  reference code's ``nn_feat_fn`` (``train=False``): so batch statistics never mix the
  support and target images that KRR compares. Once a model has taken
  ``max_online_steps`` steps it is re-initialized from a fresh key, so the pool always
  spans networks from fresh to trained (the paper's fix for overfitting to one
  optimization stage). Ages start staggered
  (``age_i = i * max_online_steps // pool_size``) so that resets are spread out.
* **Learned labels.** One-hot minus 1/C at the start; saved as ``label_kind='regression'``.

The reference code and ours. FRePo's own ``Conv`` (``lib/models/networks.py`` of
yongchao97/FRePo) doubles its width at each block (128 / 256 / 512 channels at depth 3),
pads a 1-channel image's first conv by 3, and is distilled with batch norm in the
README's commands (``--normalization=batch``: flax ``BatchNorm`` with momentum 0.1 on the
input of blocks 1 and 2; the script's default is none, and its evaluation networks drop
batch norm). Its outer optimizer is LAMB, at 3e-4 with a cosine decay to 0.1x over the
run. :data:`PARAMETER_SETS` ``['paper']`` sets all of these: ``width_growth=2``,
``first_padding=None`` (3 for 1-channel images, else 1), ``norm='batchnorm'`` with
``norm_first=True``, ``optimizer='lamb'``, ``lr_decay_steps=steps``, with the paper's pool
of 10 models, ``max_online_steps=100``, width 128, 1024 targets and the rate 3e-4. What
still differs: 20000 steps, not the reference's 500000, and no flipped copies of the
support set in the loss (the reference's ``use_flip``: on for CIFAR-10, off for MNIST
and Fashion-MNIST). The class defaults (Adam, constant rate, instance norm after each
conv, MTT's constant width) are sized for a laptop CPU.

Step functions: ``state = init(cfg, d)``; ``state, info = update(state, cfg, d)``;
:func:`run` puts :func:`kipnb.loop.run` around them (via :func:`kipnb.rfad.run_loop`):
checkpoints, exact resume, the NaN stop, history, progress and a callback.
Determinism: step ``s`` picks its model and targets from
``numpy.random.default_rng([seed, s])``; a reset model's parameters come from
``fold_in(fold_in(key(seed + 1), i), n_resets_i)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.linalg import cho_factor, cho_solve

from kipnb import checks, kip, krr, nets, preprocess, rfad
from kipnb.checkpoint import CheckpointError
from kipnb.distilled import DistilledSet

__all__ = [
    "PARAMETER_SETS",
    "CheckpointError",
    "FRePoConfig",
    "FRePoNumericalError",
    "FRePoResult",
    "feature_krr_loss",
    "init",
    "run",
    "update",
]

CHECKPOINT_NAME = "frepo_checkpoint.npz"
HIGHEST = jax.lax.Precision.HIGHEST
#: Config fields a resumed run may change.
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every", "eval_every", "eval_test_size"})
#: The outer optimizers by name.
OPTIMIZERS = {"adam": optax.adam, "lamb": optax.lamb}


class FRePoNumericalError(krr.NumericalError):
    """The FRePo loss or its gradient became NaN/Inf."""


@dataclass(frozen=True)
class FRePoConfig:
    """Everything that determines a FRePo run (frozen; ``dataclasses.replace`` to vary).

    Attributes:
        dataset: a :mod:`kipnb.data` name.
        ipc: support images per class.
        steps: outer (support-set) steps.
        pool_size: models in the pool (paper: 10).
        width, depth, norm: the pool's :class:`kipnb.nets.ConvNet` (paper: 128, 3,
            ``'batchnorm'``).
        norm_first: normalize each block's input, as FRePo's ``Conv`` (paper: True).
        first_padding: the first conv's zero padding; None: FRePo's, 3 for 1-channel
            images and 1 otherwise (paper: None).
        width_growth: the ConvNet's block ``d`` has ``width * width_growth**d`` channels
            (1: MTT's constant width; 2: FRePo's own ``Conv``, 128 / 256 / 512).
        max_online_steps: online steps after which a model is re-initialized (paper: 100).
        online_steps: online steps of the picked model per outer step.
        online_learning_rate: Adam's rate for the pool's models.
        target_batch_size: real targets per step, class balanced.
        learning_rate: the outer optimizer's rate for the support images and labels.
        optimizer: ``'adam'`` or ``'lamb'`` (the reference code's) for the support set.
        lr_decay_steps: 0 for a constant rate, else a cosine decay to 0.1x over these
            steps (the reference code's schedule, over its whole run).
        learn_labels: learn the support labels too.
        reg: KRR's relative ridge.
        preprocessing, zca_reg: :func:`kipnb.preprocess.make` method and ZCA strength.
        init: ``'real'`` or ``'noise'`` (as :class:`kipnb.kip.KIPConfig`).
        seed: initialization, model choice, resets and targets.
        eval_every: running KRR test accuracy (fixed random ConvNet features, as
            :mod:`kipnb.rfad`'s; 0: never); eval_models, eval_test_size: its size.
        checkpoint_every: steps between checkpoints.
    """

    dataset: str = "fashion_mnist"
    ipc: int = 10
    steps: int = 300
    pool_size: int = 4
    width: int = 32
    depth: int = 3
    norm: str = "instancenorm"
    max_online_steps: int = 40
    online_steps: int = 1
    online_learning_rate: float = 3e-3
    target_batch_size: int = 500
    learning_rate: float = 3e-3
    learn_labels: bool = True
    reg: float = 1e-5
    preprocessing: str = "standardize"
    zca_reg: float = 0.1
    init: str = "real"
    seed: int = 0
    eval_every: int = 50
    eval_models: int = 4
    eval_test_size: int = 2000
    checkpoint_every: int = 50
    width_growth: int = 1
    norm_first: bool = False
    first_padding: int | None = 1
    optimizer: str = "adam"
    lr_decay_steps: int = 0

    #: Fields added after checkpoints were first written, with the default under which
    #: those checkpoints still resume (:func:`kipnb.checkpoint.resumable_config`).
    ADDED_FIELDS: ClassVar[dict] = {"width_growth": 1, "norm_first": False,
                                    "first_padding": 1, "optimizer": "adam",
                                    "lr_decay_steps": 0}

    def __post_init__(self):
        checks.int_fields(self, (("ipc", 1), ("steps", 0), ("pool_size", 1), ("width", 1),
                                 ("width_growth", 1),
                                 ("depth", 1), ("max_online_steps", 1), ("online_steps", 0),
                                 ("target_batch_size", 1), ("eval_every", 0),
                                 ("eval_models", 1), ("eval_test_size", 1),
                                 ("checkpoint_every", 0), ("seed", 0),
                                 ("lr_decay_steps", 0)))
        if self.first_padding is not None:
            checks.int_fields(self, (("first_padding", 0),))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"FRePoConfig.optimizer={self.optimizer!r}: use one of "
                             f"{list(OPTIMIZERS)}.")
        if not isinstance(self.norm_first, bool):
            raise ValueError(f"FRePoConfig.norm_first={self.norm_first!r}: use True or False.")
        for name in ("learning_rate", "online_learning_rate", "reg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FRePoConfig.{name}={getattr(self, name)!r}: must be positive.")
        if self.norm not in nets.NORMS:
            raise ValueError(f"FRePoConfig.norm={self.norm!r}: use one of {list(nets.NORMS)}.")
        if self.preprocessing not in preprocess.METHODS:
            raise ValueError(f"FRePoConfig.preprocessing={self.preprocessing!r}: use one of "
                             f"{', '.join(preprocess.METHODS)}.")
        if self.init not in ("real", "noise"):
            raise ValueError(f"FRePoConfig.init={self.init!r}: use 'real' or 'noise'.")

    def net(self, num_classes: int = 10, channels: int = 1) -> nets.ConvNet:
        """The pool's network, for images with ``channels`` channels."""
        pad = self.first_padding
        if pad is None:
            pad = 3 if channels == 1 else 1
        return nets.ConvNet(width=self.width, depth=self.depth, norm=self.norm,
                            num_classes=num_classes, width_growth=self.width_growth,
                            norm_first=self.norm_first, first_padding=pad)

    def outer_optimizer(self) -> optax.GradientTransformation:
        """The support set's optimizer: Adam or LAMB, at ``learning_rate`` or its cosine decay."""
        rate = self.learning_rate
        if self.lr_decay_steps:
            rate = optax.cosine_decay_schedule(self.learning_rate, self.lr_decay_steps,
                                               alpha=0.1)
        return OPTIMIZERS[self.optimizer](rate)


#: Named settings. ``'paper'``: the paper's pool (GPU-sized).
PARAMETER_SETS: dict[str, FRePoConfig] = {
    "paper": FRePoConfig(pool_size=10, width=128, width_growth=2, max_online_steps=100,
                         norm="batchnorm", norm_first=True, first_padding=None,
                         optimizer="lamb", lr_decay_steps=20000,
                         online_learning_rate=3e-4, learning_rate=3e-4,
                         target_batch_size=1024, reg=1e-6, steps=20000, eval_every=500),
    "cpu": FRePoConfig(),
}


@dataclass(frozen=True, eq=False)
class FRePoResult:
    """What :func:`run` returns: the distilled set, the history and the final state."""

    distilled: DistilledSet
    history: dict
    config: FRePoConfig
    state: dict = field(default_factory=dict)


def feature_krr_loss(f_s, y_s, f_t, y_t, reg: float = 1e-6):
    """FRePo's loss from features: ``(0.5 * mean (pred - y_t)^2, batch accuracy)``.

    ``pred = f_t f_s^T (f_s f_s^T + reg tr/n I)^{-1} y_s``.

    Example:
        >>> f = jnp.eye(3)
        >>> y = jnp.eye(3) - 1 / 3
        >>> loss, acc = feature_krr_loss(f, y, f, y)
        >>> round(float(loss), 6), float(acc)
        (0.0, 1.0)
    """
    k_ss = jnp.matmul(f_s, f_s.T, precision=HIGHEST)
    k_ts = jnp.matmul(f_t, f_s.T, precision=HIGHEST)
    lower, _ = cho_factor(krr.regularized(k_ss, reg), lower=True)
    pred = jnp.matmul(k_ts, cho_solve((lower, True), y_s), precision=HIGHEST)
    loss = 0.5 * jnp.mean((pred - y_t) ** 2)
    acc = jnp.mean(jnp.argmax(pred, 1) == jnp.argmax(y_t, 1))
    return loss, acc


def _take(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _put(tree, i, value):
    return jax.tree_util.tree_map(lambda a, v: a.at[i].set(v), tree, value)


def _fns(config: FRePoConfig, input_shape: tuple, num_classes: int):
    return _compiled(rfad.step_key(config), input_shape, num_classes)


@functools.lru_cache(maxsize=16)
def _compiled(config: FRePoConfig, input_shape: tuple, num_classes: int):
    net = config.net(num_classes, input_shape[-1])
    opt = optax.multi_transform(
        {"main": config.outer_optimizer(), "frozen": optax.set_to_zero()},
        {"images": "main", "labels": "main" if config.learn_labels else "frozen"})
    online = optax.adam(config.online_learning_rate)

    def new_model(key):
        p = net.init(key, input_shape)
        return p, online.init(p), net.init_state()

    def reset_key(i, n):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed + 1), i), n)

    @jax.jit
    def step(params, opt_state, pool, pool_opt, pool_bn, age, resets, i, x_t, t_classes):
        model, bn = _take(pool, i), _take(pool_bn, i)
        y_t = jax.nn.one_hot(t_classes, num_classes) - 1.0 / num_classes
        f_t = jax.lax.stop_gradient(net.features(model, x_t, state=bn))

        def loss_fn(p):
            return feature_krr_loss(net.features(model, p["images"], state=bn), p["labels"],
                                    f_t, y_t, config.reg)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, new_opt = opt.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))

        # online training of model i on the (updated) distilled set
        x_s, y_s = jax.lax.stop_gradient(new["images"]), jax.lax.stop_gradient(new["labels"])
        m_opt = _take(pool_opt, i)

        def online_loss(q, b):
            logits, b = net.apply_train(q, b, x_s)
            return 0.5 * jnp.mean((logits - y_s) ** 2), b

        def online_step(carry, _):
            m, o, b = carry
            g, b = jax.grad(online_loss, has_aux=True)(m, b)
            u, o = online.update(g, o, m)
            return (optax.apply_updates(m, u), o, b), None

        (model, m_opt, bn), _ = jax.lax.scan(online_step, (model, m_opt, bn), None,
                                             length=config.online_steps)
        a = age[i] + config.online_steps
        do_reset = a >= config.max_online_steps
        fresh, fresh_opt, fresh_bn = new_model(reset_key(i, resets[i] + 1))

        def pick(f, m):
            return jax.tree_util.tree_map(lambda u, v: jnp.where(do_reset, u, v), f, m)

        model, m_opt, bn = pick(fresh, model), pick(fresh_opt, m_opt), pick(fresh_bn, bn)
        pool, pool_opt = _put(pool, i, model), _put(pool_opt, i, m_opt)
        pool_bn = _put(pool_bn, i, bn)
        age = age.at[i].set(jnp.where(do_reset, 0, a))
        resets = resets.at[i].add(do_reset.astype(resets.dtype))
        return new, new_opt, pool, pool_opt, pool_bn, age, resets, loss, acc, finite

    return net, opt, new_model, reset_key, step


def init(config: FRePoConfig, d) -> dict:
    """The starting state: support ``params``, its ``opt_state``, the model ``pool``
    (stacked parameters), ``pool_opt``, ``age`` and ``resets`` per model, ``step``; with
    ``norm='batchnorm'`` also ``pool_bn``, the models' running statistics.

    Args:
        config: the :class:`FRePoConfig`.
        d: prepared data (:func:`kipnb.kip.prepare`).

    Returns:
        A dict pytree of arrays.
    """
    kcfg = kip.KIPConfig(dataset=config.dataset, ipc=config.ipc, init=config.init,
                         seed=config.seed, preprocessing=config.preprocessing)
    support = kip.init_support(kcfg, d)
    params = {"images": support["images"], "labels": support["labels"]}
    _, opt, new_model, reset_key, _ = _fns(config, tuple(d.x_train.shape[1:]), d.num_classes)
    models = [new_model(reset_key(i, 0)) for i in range(config.pool_size)]
    pool = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[m[0] for m in models])
    pool_opt = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[m[1] for m in models])
    age = jnp.asarray([i * config.max_online_steps // config.pool_size
                       for i in range(config.pool_size)], jnp.int32)
    state = {"params": params, "opt_state": opt.init(params), "pool": pool,
             "pool_opt": pool_opt, "age": age,
             "resets": jnp.zeros((config.pool_size,), jnp.int32),
             "step": jnp.zeros((), jnp.int32)}
    if config.norm == "batchnorm":  # (the key is absent otherwise: older checkpoints resume)
        state["pool_bn"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                                  *[m[2] for m in models])
    return state


def update(state: dict, config: FRePoConfig, d) -> tuple[dict, dict]:
    """One FRePo step: pick a model, update the support set, train the model, maybe reset it.

    Args:
        state: from :func:`init` or a previous :func:`update`.
        config: the :class:`FRePoConfig`.
        d: prepared data.

    Returns:
        ``(new_state, info)`` with ``step``, ``loss``, ``batch_acc``, ``model``,
        ``finite``; when not ``finite`` the state comes back unchanged.
    """
    s = int(state["step"])
    idx = rfad.target_indices(config.seed, s, d.labels_train, config.target_batch_size,
                              d.num_classes)
    i = int(np.random.default_rng([config.seed, s, 1]).integers(config.pool_size))
    step = _fns(config, tuple(d.x_train.shape[1:]), d.num_classes)[-1]
    new, new_opt, pool, pool_opt, pool_bn, age, resets, loss, acc, finite = step(
        state["params"], state["opt_state"], state["pool"], state["pool_opt"],
        state.get("pool_bn", {}), state["age"], state["resets"], jnp.asarray(i, jnp.int32),
        jnp.asarray(d.x_train[idx]), jnp.asarray(d.labels_train[idx], jnp.int32))
    info = {"step": s + 1, "loss": float(loss), "batch_acc": float(acc), "model": i,
            "finite": bool(finite)}
    if not info["finite"]:
        return state, info
    out = {"params": new, "opt_state": new_opt, "pool": pool, "pool_opt": pool_opt,
           "age": age, "resets": resets, "step": jnp.asarray(s + 1, jnp.int32)}
    if "pool_bn" in state:
        out["pool_bn"] = pool_bn
    return out, info


def _evaluator(config: FRePoConfig, d):
    ecfg = rfad.RFADConfig(dataset=config.dataset, eval_models=config.eval_models,
                           eval_test_size=config.eval_test_size, reg=config.reg,
                           seed=config.seed)
    return rfad.RandomFeatureEvaluator(ecfg, d)


def run(config: FRePoConfig, d=None, *, checkpoint_dir=None,
        callback: Callable[[dict], Any] | None = None, progress: bool = True,
        data_dir=None) -> FRePoResult:
    """Run FRePo: :func:`init`, then :func:`update` ``config.steps`` times.

    This is :func:`kipnb.loop.run` (through :func:`kipnb.rfad.run_loop`: checkpoints,
    exact resume, NaN stop, history, progress, callback) over the public step functions;
    a hand-written loop ``state = init(config, d)``, ``state, info = update(state,
    config, d)`` gives the same set.

    Args:
        config: the :class:`FRePoConfig`.
        d: prepared data (:func:`kipnb.kip.prepare`; loaded from ``config`` if None).
        checkpoint_dir: ``frepo_checkpoint.npz`` is written there every
            ``checkpoint_every`` steps and at the end; a run of the same config finds it
            and resumes exactly (``steps`` etc. may change, :data:`RESUMABLE_CHANGES`).
        callback: called after every step with ``step``, ``loss``, ``batch_acc``,
            ``model`` (the pool model used), ``test_acc`` on evaluation steps and
            ``last`` (e.g. :class:`kipnb.viz.LivePlot`); returning
            :data:`kipnb.loop.STOP` stops the run (checkpointed first).
        progress: a tqdm bar.
        data_dir: where to look for the dataset files.

    Returns:
        :class:`FRePoResult`: ``distilled`` (``label_kind='regression'``, the resets per
        model in ``extra['resets']``), ``history`` (``step``, ``loss``, ``batch_acc``,
        ``model``; ``eval_step``, ``test_acc``, ``wall_time``; ``seconds``), the state.

    Raises:
        FRePoNumericalError: the loss or gradient became NaN/Inf (the update is not
            applied; the last checkpoint is kept).
        CheckpointError: ``checkpoint_dir`` holds a checkpoint of another run.

    Example:
        >>> d = kip.prepare("digits")  # doctest: +SKIP
        >>> res = run(FRePoConfig(dataset="digits", ipc=1, steps=20), d)  # doctest: +SKIP
        >>> len(res.distilled.extra["resets"])  # one count per pool model  # doctest: +SKIP
        4
    """
    if not isinstance(config, FRePoConfig):
        raise TypeError(f"config must be a FRePoConfig, got {type(config).__name__}.")
    d = rfad.check_data(config, d, data_dir)
    state = init(config, d)
    classes = np.asarray(state["params"]["labels"]).argmax(axis=1).astype(np.int32)

    def nan_error(step: int, metrics: dict, kept: str) -> Exception:
        return FRePoNumericalError(
            f"FRePo step {step}: the loss or its gradient is NaN/Inf "
            f"(loss={metrics['loss']}); the update was not applied. {kept} Fixes: raise "
            f"reg (now {config.reg:g}), lower learning_rate (now "
            f"{config.learning_rate:g}) or online_learning_rate (now "
            f"{config.online_learning_rate:g}).")

    history = {"step": [], "loss": [], "batch_acc": [], "model": [], "eval_step": [],
               "test_acc": [], "wall_time": []}
    out = rfad.run_loop(
        "FRePo", config, d, state, update, history=history,
        checkpoint_path=None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME,
        evaluate=_evaluator(config, d) if config.eval_every else None,
        nan_error=nan_error, callback=callback, progress=progress, free=RESUMABLE_CHANGES)
    state, history = out.state, out.history
    p = {k: np.asarray(v) for k, v in state["params"].items()}
    distilled = DistilledSet(
        images=p["images"], labels=p["labels"], label_kind="regression",
        num_classes=d.num_classes, classes=classes, transform=d.transform,
        source={"method": "frepo",
                "learner": f"krr on convnet{config.depth} features (pool of "
                           f"{config.pool_size}, width {config.width}, {config.norm})",
                "config": dataclasses.asdict(config), "dataset": config.dataset,
                "ipc": config.ipc, "data_fingerprint": d.fingerprint(), "init": config.init},
        extra={"steps": int(state["step"]),
               "resets": np.asarray(state["resets"]).tolist(),
               "test_acc": history["test_acc"][-1] if history["test_acc"] else None},
    )
    return FRePoResult(distilled=distilled, history=history, config=config, state=state)
