"""Trajectory matching: MTT (Cazenavette et al. 2022) and DATM (Guo et al. 2024) in JAX.

The idea
--------
*Experts* are networks trained on the real data; their parameters after every epoch form
a trajectory (:mod:`kipnb.experts`). MTT learns synthetic images such that a *student*
that starts from an expert's parameters at epoch ``t`` and takes ``syn_steps`` SGD steps
on synthetic minibatches lands close to the same expert's parameters at epoch
``t + expert_epochs``. With ``θ_0`` the starting, ``θ_N`` the student's final and ``θ*``
the target parameters (flat vectors), the loss is

    L = ||θ_N − θ*||² / ||θ_0 − θ*||²

and its gradient flows back through all ``syn_steps`` student updates into the synthetic
images and into the student's learning rate ``α`` (learned too, initialized at the
experts' ``lr_teacher``). Images and ``α`` are updated by SGD with momentum 0.5, as in
MTT's ``distill.py``. Every student step sees its minibatch through the same
differentiable augmentation as the experts (:func:`kipnb.augment.augment`).

DATM ("difficulty-aligned trajectory matching") changes three things:

* **the matched stage follows the set size**: the start epoch is drawn from a window
  ``[min_start_epoch, upper)`` whose upper bound grows linearly from
  ``current_max_start_epoch`` to ``max_start_epoch`` over the first ``expansion_end``
  iterations (DATM's "sequential generation"): few images per class match early, easy
  trajectories; larger sets later, harder ones;
* **soft labels**: every synthetic image carries a learnable vector of logits; the
  student's loss is the soft cross-entropy ``−Σ_c softmax(ℓ)_c log softmax(f(x))_c``.
  The logits start as the average, over the experts, of the experts' logits on that
  image, counting only the experts that classify it correctly, and are learned by their
  own SGD (``lr_label``, momentum 0.9);
* **initialization from correctly classified images** (``init='correct'``): the
  synthetic images start as real images that an expert (at ``label_epoch``) classifies
  correctly. DATM also skips the update of an iteration whose loss exceeds
  ``threshold``.

Both are :func:`run` with a :class:`TMConfig`; ``TMConfig(method='datm')`` switches DATM's
defaults on (soft labels, ``init='correct'``). :data:`PARAMETER_SETS` holds the papers'
CIFAR-10 settings (expert, distillation and evaluation parameters) and small
Fashion-MNIST settings that run on a laptop CPU.

How the student is unrolled
---------------------------
``loop='scan'`` writes the ``syn_steps`` student updates as one :func:`jax.lax.scan`
(augmentation included) and differentiates through it with ``jax.grad``: one compiled
program, the right choice on GPU and TPU. On CPU, XLA runs convolutions inside loop
bodies far slower than outside (jax issue #12868; measured here: 20 steps of a width-32
ConvNet, 12x slower forward, 4.5x slower with the gradient), so ``loop='python'`` runs
the same steps as separately jitted functions: the forward pass stores each step's
parameters, the backward pass walks the steps in reverse and applies each step's VJP
(reverse-mode by hand, one step rematerialized at a time; memory ``syn_steps`` parameter
vectors). Both compute the same function with the same randomness; ``tests/test_tm.py``
checks that their losses and gradients agree. ``loop='auto'`` (default) picks ``python``
on CPU and ``scan`` elsewhere. On CPU the student's convolutions are also computed as
patch matrix products (``nets.ConvNet.apply(conv='im2col')``, the same function): the
second derivatives MTT needs are then matrix products, 2.5-3x faster there than XLA:CPU's
convolution gradients (measured: one MTT iteration, width-32 ConvNet, 10 images, 20
steps: 0.40-0.52 s against 1.1-1.3 s).

Randomness: everything an iteration draws (expert, start epoch, minibatches, augmentation)
comes from ``(seed, iteration)``, so a run that is interrupted and resumed from its
checkpoint gives the same images as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from kipnb import augment as augment_lib
from kipnb import experts, loop, nets
from kipnb.checks import is_int as _is_int
from kipnb.distilled import DistilledSet

__all__ = [
    "CHECKPOINT_NAME",
    "INITS",
    "LOOPS",
    "METHODS",
    "PARAMETER_SETS",
    "TMBatch",
    "TMConfig",
    "TMNumericalError",
    "TMResult",
    "TMState",
    "distill_setting",
    "init",
    "init_labels",
    "init_synthetic",
    "iteration_batch",
    "matching_loss",
    "normalized_distance",
    "run",
    "start_epoch_window",
    "update",
]

METHODS = ("mtt", "datm")
INITS = ("real", "noise", "correct", "importance")
LOOPS = ("auto", "scan", "python")
CHECKPOINT_NAME = "tm_checkpoint.npz"


class TMNumericalError(FloatingPointError):
    """The matching loss or its gradient became NaN/Inf."""


def _is_pos(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class TMConfig:
    """Settings of one MTT or DATM distillation (defaults: MTT, CPU-sized).

    Attributes:
      method: ``'mtt'`` or ``'datm'``. ``'datm'`` turns on, unless set explicitly, soft
        labels (``soft_labels=None`` -> True) and ``init=None`` -> ``'correct'``.
      ipc: synthetic images per class.
      iterations: distillation iterations (MTT: 5000, DATM: 10000).
      syn_steps: student SGD steps per iteration (MTT's N).
      expert_epochs: the target is this many expert epochs after the start (MTT's M).
      max_start_epoch: start epochs are drawn from ``[min_start_epoch, upper)`` with
        ``upper`` at most this (MTT's T+).
      min_start_epoch: lower end of the window (DATM).
      current_max_start_epoch: DATM's initial upper bound; it grows linearly to
        ``max_start_epoch`` by iteration ``expansion_end``. None: a fixed window.
      expansion_end: iteration at which the window reaches ``max_start_epoch``.
      lr_img, lr_lr, lr_label: learning rates of the images, of the student's learning
        rate and of the soft labels (SGD, momentum ``momentum_img``, ``momentum_lr``,
        ``momentum_label``: 0.5, 0.5, 0.9 as in MTT/DATM).
      lr_teacher: initial student learning rate (the experts' lr).
      batch_syn: synthetic images per student step (None: all of them). Minibatches are
        consecutive chunks of a fresh permutation, as MTT's; a remainder is dropped.
      init: ``'real'`` random real images of each class, ``'noise'`` standard normal
        pixels (model space), ``'correct'`` real images an expert classifies correctly
        (DATM), ``'importance'`` real images drawn by per-class k-means sensitivity
        (:mod:`kipnb.sampling`). None: ``'real'`` for MTT, ``'correct'`` for DATM.
      soft_labels: learn logits per image (DATM). None: by method.
      label_epoch: the expert epoch whose logits initialize the soft labels and pick
        correct images (DATM's ``Label_Model_Timestamp``; -1: the last).
      threshold: skip the update when the loss exceeds it (DATM: 1.0 / 1.1). None: never.
      augment: DSA strategy of the student's minibatches (``'none'`` to turn off).
      loop: ``'auto'``, ``'scan'`` or ``'python'`` (see the module docstring).
      eval_every: evaluate every this many iterations (0: only at the end, if
        ``eval_at_end``) by training fresh networks (``evaluation``).
      eval_at_end: evaluate after the last iteration.
      evaluation: the :class:`kipnb.experts.EvalConfig` used for those evaluations.
      checkpoint_every: iterations between checkpoints (with a ``checkpoint_dir``).
      seed: everything random derives from it.
    """

    method: str = "mtt"
    ipc: int = 1
    iterations: int = 200
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 2
    min_start_epoch: int = 0
    current_max_start_epoch: int | None = None
    expansion_end: int = 1000
    lr_img: float = 100.0
    lr_lr: float = 1e-5
    lr_label: float = 2.0
    lr_teacher: float = 0.01
    momentum_img: float = 0.5
    momentum_lr: float = 0.5
    momentum_label: float = 0.9
    batch_syn: int | None = None
    init: str | None = None
    soft_labels: bool | None = None
    label_epoch: int = -1
    threshold: float | None = None
    augment: str = augment_lib.DEFAULT_STRATEGY
    loop: str = "auto"
    eval_every: int = 0
    eval_at_end: bool = True
    evaluation: experts.EvalConfig = field(default_factory=experts.EvalConfig)
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: use 'mtt' or 'datm'.")
        if self.init is None:
            object.__setattr__(self, "init", "correct" if self.method == "datm" else "real")
        if self.soft_labels is None:
            object.__setattr__(self, "soft_labels", self.method == "datm")
        if self.init not in INITS:
            raise ValueError(f"Unknown init {self.init!r}: use one of {list(INITS)}.")
        if self.loop not in LOOPS:
            raise ValueError(f"Unknown loop {self.loop!r}: use one of {list(LOOPS)}.")
        if not isinstance(self.soft_labels, bool):
            raise ValueError(f"soft_labels must be True or False, got {self.soft_labels!r}.")
        for name in ("ipc", "iterations", "syn_steps", "expert_epochs", "max_start_epoch",
                     "expansion_end"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        for name in ("min_start_epoch", "eval_every", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}.")
        if self.min_start_epoch >= self.max_start_epoch:
            raise ValueError(
                f"min_start_epoch ({self.min_start_epoch}) must be below max_start_epoch "
                f"({self.max_start_epoch}): start epochs are drawn from [min, max)."
            )
        c = self.current_max_start_epoch
        if c is not None and (not _is_int(c)
                              or not self.min_start_epoch < c <= self.max_start_epoch):
            raise ValueError(
                f"current_max_start_epoch must be an integer in (min_start_epoch, "
                f"max_start_epoch] = ({self.min_start_epoch}, {self.max_start_epoch}], got {c!r}."
            )
        for name in ("lr_img", "lr_lr", "lr_label", "lr_teacher"):
            if not _is_pos(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}.")
        for name in ("momentum_img", "momentum_lr", "momentum_label"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}.")
        if self.batch_syn is not None and (not _is_int(self.batch_syn) or self.batch_syn < 1):
            raise ValueError(
                f"batch_syn must be a positive integer or None, got {self.batch_syn!r}.")
        if self.threshold is not None and not _is_pos(self.threshold):
            raise ValueError(
                f"threshold must be a positive number or None, got {self.threshold!r}.")
        if not _is_int(self.label_epoch):
            raise ValueError(
                f"label_epoch must be an integer (-1: last), got {self.label_epoch!r}.")
        augment_lib.strategy_groups(self.augment)  # raises on an unknown strategy
        if not isinstance(self.evaluation, experts.EvalConfig):
            raise ValueError(
                "evaluation must be a kipnb.experts.EvalConfig, got "
                f"{type(self.evaluation).__name__}."
            )

    def resolved_loop(self) -> str:
        if self.loop != "auto":
            return self.loop
        return "python" if jax.default_backend() == "cpu" else "scan"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["evaluation"] = dataclasses.asdict(self.evaluation)
        return d


def start_epoch_window(config: TMConfig, iteration: int) -> tuple[int, int]:
    """``(lo, hi)``: iteration ``iteration``'s start epoch is uniform in ``[lo, hi)``.

    MTT: ``[0, max_start_epoch)``. DATM's sequential generation: the upper bound is
    ``current + int((max - current) * iteration / expansion_end)``, capped at ``max``.
    """
    hi = config.max_start_epoch
    if config.current_max_start_epoch is not None:
        c = config.current_max_start_epoch
        hi = min(c + int((hi - c) * iteration / config.expansion_end), hi)
    return config.min_start_epoch, hi


# ------------------------------------------------------------------------ parameter sets

_CIFAR_EXPERTS = dict(dataset="cifar10", width=128, depth=3, num_experts=100, epochs=50,
                      lr=0.01, batch_size=256, preprocessing="zca_kornia", zca_reg=0.1)
_FASHION_EXPERTS = dict(dataset="fashion_mnist", width=32, depth=3, num_experts=5, epochs=8,
                        lr=0.01, batch_size=256, preprocessing="standardize")

#: Named settings: ``{'experts': ExpertConfig kwargs, 'tm': TMConfig kwargs, 'eval':
#: EvalConfig kwargs, 'published': test accuracy %, 'source': where the numbers come from}``.
#: ``distill_setting(name)`` builds the three configs.
PARAMETER_SETS: dict[str, dict] = {
    # MTT, CIFAR-10, ConvNet-3 (width 128, instance norm), ZCA; the paper's appendix table.
    "mtt_cifar10_ipc1": dict(
        experts=_CIFAR_EXPERTS,
        tm=dict(method="mtt", ipc=1, iterations=5000, syn_steps=50, expert_epochs=2,
                max_start_epoch=2, lr_img=1000.0, lr_lr=1e-7, lr_teacher=0.01),
        eval=dict(epochs=1001, batch_size=256), published=46.3,
        source="MTT (Cazenavette et al. 2022), CIFAR-10 hyper-parameter table",
    ),
    "mtt_cifar10_ipc10": dict(
        experts=_CIFAR_EXPERTS,
        tm=dict(method="mtt", ipc=10, iterations=5000, syn_steps=30, expert_epochs=2,
                max_start_epoch=20, lr_img=1e5, lr_lr=1e-5, lr_teacher=0.01),
        eval=dict(epochs=1001, batch_size=256), published=65.3,
        source="MTT (Cazenavette et al. 2022), CIFAR-10 hyper-parameter table",
    ),
    "mtt_cifar10_ipc50": dict(
        experts={**_CIFAR_EXPERTS, "preprocessing": "standardize"},
        tm=dict(method="mtt", ipc=50, iterations=5000, syn_steps=30, expert_epochs=2,
                max_start_epoch=40, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01),
        eval=dict(epochs=1001, batch_size=256), published=71.6,
        source="MTT (Cazenavette et al. 2022), CIFAR-10 hyper-parameter table",
    ),
    # DATM, CIFAR-10, ConvNet-3 (instance norm), ZCA: configs/CIFAR-10/ConvIN/IPC*.yaml
    # of the DATM repository, with the paper's 1-ipc window 2 -> 4.
    "datm_cifar10_ipc1": dict(
        experts=_CIFAR_EXPERTS,
        tm=dict(method="datm", ipc=1, iterations=10000, syn_steps=80, expert_epochs=2,
                min_start_epoch=0, current_max_start_epoch=2, max_start_epoch=4,
                expansion_end=1000, lr_img=100.0, lr_lr=1e-7, lr_label=5.0,
                lr_teacher=0.01, threshold=1.1),
        eval=dict(epochs=1001, batch_size=128), published=46.9,
        source="DATM (Guo et al. 2024), configs/CIFAR-10/ConvIN/IPC1.yaml",
    ),
    "datm_cifar10_ipc10": dict(
        experts=_CIFAR_EXPERTS,
        tm=dict(method="datm", ipc=10, iterations=10000, syn_steps=80, expert_epochs=2,
                min_start_epoch=0, current_max_start_epoch=10, max_start_epoch=20,
                expansion_end=1000, lr_img=100.0, lr_lr=1e-5, lr_label=2.0,
                lr_teacher=0.01, threshold=1.0, batch_syn=100),
        eval=dict(epochs=1001, batch_size=128), published=66.8,
        source="DATM (Guo et al. 2024), configs/CIFAR-10/ConvIN/IPC10.yaml",
    ),
    "datm_cifar10_ipc50": dict(
        experts=_CIFAR_EXPERTS,
        tm=dict(method="datm", ipc=50, iterations=10000, syn_steps=80, expert_epochs=2,
                min_start_epoch=0, current_max_start_epoch=20, max_start_epoch=40,
                expansion_end=2000, lr_img=1000.0, lr_lr=1e-5, lr_label=2.0,
                lr_teacher=0.01, threshold=1.0, batch_syn=500),
        eval=dict(epochs=1001, batch_size=128), published=76.1,
        source="DATM (Guo et al. 2024), configs/CIFAR-10/ConvIN/IPC50.yaml",
    ),
    # Fashion-MNIST on a CPU: narrow ConvNet-3 (width 32), few experts and epochs.
    "mtt_fashion_ipc1": dict(
        experts=_FASHION_EXPERTS,
        tm=dict(method="mtt", ipc=1, iterations=300, syn_steps=20, expert_epochs=2,
                max_start_epoch=2, lr_img=100.0, lr_lr=1e-5, lr_teacher=0.01),
        eval=dict(epochs=300, batch_size=256), published=None,
        source="kipnb CPU setting (MTT's CIFAR-10 1-ipc choices, fewer steps)",
    ),
    "mtt_fashion_ipc10": dict(
        experts=_FASHION_EXPERTS,
        tm=dict(method="mtt", ipc=10, iterations=300, syn_steps=20, expert_epochs=2,
                max_start_epoch=4, lr_img=100.0, lr_lr=1e-5, lr_teacher=0.01),
        eval=dict(epochs=300, batch_size=256), published=None,
        source="kipnb CPU setting",
    ),
    "datm_fashion_ipc1": dict(
        experts=_FASHION_EXPERTS,
        tm=dict(method="datm", ipc=1, iterations=300, syn_steps=20, expert_epochs=2,
                min_start_epoch=0, current_max_start_epoch=1, max_start_epoch=3,
                expansion_end=200, lr_img=100.0, lr_lr=1e-5, lr_label=5.0,
                lr_teacher=0.01, threshold=1.1),
        eval=dict(epochs=300, batch_size=128), published=None,
        source="kipnb CPU setting (DATM's CIFAR-10 1-ipc choices, fewer steps)",
    ),
    "datm_fashion_ipc10": dict(
        experts=_FASHION_EXPERTS,
        tm=dict(method="datm", ipc=10, iterations=300, syn_steps=20, expert_epochs=2,
                min_start_epoch=0, current_max_start_epoch=2, max_start_epoch=5,
                expansion_end=200, lr_img=100.0, lr_lr=1e-5, lr_label=2.0,
                lr_teacher=0.01, threshold=1.0),
        eval=dict(epochs=300, batch_size=128), published=None,
        source="kipnb CPU setting",
    ),
}


def distill_setting(name: str, **overrides) -> tuple[experts.ExpertConfig, TMConfig]:
    """``(ExpertConfig, TMConfig)`` of a :data:`PARAMETER_SETS` entry.

    Keyword overrides go to the ``TMConfig`` (``expert_<field>=`` to the ExpertConfig);
    the entry's evaluation settings become ``TMConfig.evaluation``.
    """
    if name not in PARAMETER_SETS:
        raise ValueError(f"Unknown parameter set {name!r}: use one of {sorted(PARAMETER_SETS)}.")
    entry = PARAMETER_SETS[name]
    ex = dict(entry["experts"])
    tm = dict(entry["tm"], evaluation=experts.EvalConfig(**entry["eval"]))
    for k, v in overrides.items():
        if k.startswith("expert_"):
            ex[k[len("expert_"):]] = v
        else:
            tm[k] = v
    return experts.ExpertConfig(**ex), TMConfig(**tm)


# ---------------------------------------------------------------------------- init


def _class_picks(rng: np.random.Generator, labels: np.ndarray, c: int, n: int) -> np.ndarray:
    idx = np.flatnonzero(labels == c)
    if len(idx) < n:
        raise ValueError(
            f"Cannot take {n} images of class {c}: the training data have {len(idx)}. "
            f"Use ipc <= {len(idx)}."
        )
    return rng.permutation(idx)


def _expert_params(traj: experts.Trajectories, expert: int, epoch: int):
    return nets.unflatten_params(jnp.asarray(traj.params[expert, epoch]), traj.template)


@functools.partial(jax.jit, static_argnums=0)
def _apply(net, params, x):
    return net.apply(params, x)


def _logits(net, params, x: np.ndarray, block: int = 1000) -> np.ndarray:
    """``net``'s logits on ``x`` in blocks (one compilation per network and block shape)."""
    return np.concatenate([np.asarray(_apply(net, params, jnp.asarray(x[i:i + block])))
                           for i in range(0, len(x), block)])


def init_synthetic(config: TMConfig, data: experts.TMData,
                   traj: experts.Trajectories | None = None) -> np.ndarray:
    """Initial synthetic images (model space), class by class: ``(C * ipc, H, W, C_in)``."""
    rng = np.random.default_rng([config.seed, 1])
    C, n = data.num_classes, config.ipc
    y = np.asarray(data.y_train)
    if config.init == "noise":
        return rng.standard_normal((C * n, *data.image_shape)).astype(np.float32)
    if config.init == "importance":
        from kipnb import sampling

        scores = sampling.kmeans_sensitivity(data.x_train, y, C, seed=config.seed)
        idx = sampling.sample_init(config.seed, scores, y, n, C)
        return np.asarray(data.x_train[idx], np.float32)
    picks = []
    if config.init == "real":
        for c in range(C):
            picks.append(np.sort(_class_picks(rng, y, c, n)[:n]))
        return np.asarray(data.x_train[np.concatenate(picks)], np.float32)
    # 'correct': real images that an expert (at label_epoch) classifies correctly; like
    # DATM, move on to the next expert for a class where one expert has too few.
    if traj is None:
        raise ValueError("init='correct' needs the expert trajectories.")
    net = traj.net
    cache: dict[int, np.ndarray] = {}
    for c in range(C):
        order = _class_picks(rng, y, c, n)
        chosen: list[int] = []
        for e in range(traj.num_experts):
            if e not in cache:
                cache[e] = _logits(net, _expert_params(traj, e, config.label_epoch),
                                   data.x_train).argmax(1)
            ok = order[cache[e][order] == c]
            chosen += [i for i in ok if i not in chosen][: n - len(chosen)]
            if len(chosen) == n:
                break
        if len(chosen) < n:
            raise ValueError(
                f"init='correct': the experts classify only {len(chosen)} training images "
                f"of class {c} correctly, fewer than ipc={n}. Train the experts longer or "
                f"use init='real'."
            )
        picks.append(np.sort(np.asarray(chosen)))
    return np.asarray(data.x_train[np.concatenate(picks)], np.float32)


def init_labels(config: TMConfig, images: np.ndarray, classes: np.ndarray,
                traj: experts.Trajectories | None) -> np.ndarray:
    """The synthetic labels: one-hot (MTT) or DATM's soft-label logits ``(n, C)``.

    DATM: for every image, the mean of the experts' logits (at ``label_epoch``) over the
    experts that classify it correctly. An image no expert gets right keeps the mean over
    all experts (DATM would divide by zero).
    """
    C = int(classes.max()) + 1
    if not config.soft_labels:
        return np.eye(C, dtype=np.float32)[classes]
    if traj is None:
        raise ValueError("Soft labels are initialized from the experts: pass the trajectories.")
    all_logits = np.stack([
        _logits(traj.net, _expert_params(traj, e, config.label_epoch), images)
        for e in range(traj.num_experts)
    ])  # (E, n, C)
    correct = all_logits.argmax(-1) == classes[None]
    count = correct.sum(0)
    mean_ok = (all_logits * correct[..., None]).sum(0) / np.maximum(count, 1)[:, None]
    out = np.where(count[:, None] > 0, mean_ok, all_logits.mean(0))
    return out.astype(np.float32)


# ------------------------------------------------------------------- the matching loss


def _student_fns(net, template, strategy: str, soft: bool, conv: str = "xla"):
    _, unravel = ravel_pytree(template)
    params = augment_lib.DSAParams()
    apply = functools.partial(net.apply, conv=conv) if isinstance(net, nets.ConvNet) else net.apply

    def ce(w, xb, tb):
        out = apply(unravel(w), xb)
        return -jnp.mean(jnp.sum(tb * jax.nn.log_softmax(out), axis=-1))

    def step(w, images, labels, lr, idx, key):
        xb = images[idx]
        tb = jax.nn.softmax(labels[idx], axis=-1) if soft else labels[idx]
        if strategy != "none":
            xb = augment_lib.augment(key, xb, strategy, params)
        return w - lr * jax.grad(ce)(w, xb, tb)

    return step


def normalized_distance(end, start, target):
    """MTT's normalised matching loss ``||end - target||^2 / ||start - target||^2``.

    Args:
      end: the student's flat parameters after its steps on the synthetic set.
      start: the expert's flat parameters at the start epoch (where the student began).
      target: the expert's flat parameters ``expert_epochs`` later.

    Returns:
      A scalar: 1 means the student ended as far from the target as it started.

    Example:
      >>> float(normalized_distance(jnp.ones(3), jnp.zeros(3), 2 * jnp.ones(3)))
      0.25
    """
    return jnp.sum((end - target) ** 2) / jnp.sum((start - target) ** 2)


def matching_loss(step, images, labels, lr, start, target, idx, keys):
    """MTT's normalized parameter distance after ``len(idx)`` student steps (scan form)."""

    def body(w, inp):
        i, k = inp
        return step(w, images, labels, lr, i, k), None

    w, _ = jax.lax.scan(body, start, (idx, keys))
    return normalized_distance(w, start, target)


class _Matcher:
    """Loss and gradients w.r.t. (images, labels, lr) by ``scan`` or by stepwise VJPs."""

    def __init__(self, net, template, config: TMConfig):
        self.loop = config.resolved_loop()
        cpu = jax.default_backend() == "cpu"
        step = _student_fns(net, template, config.augment, config.soft_labels,
                            "im2col" if cpu else "xla")
        self._scan = jax.jit(jax.value_and_grad(
            lambda im, lab, lr, s, t, i, k: matching_loss(step, im, lab, lr, s, t, i, k),
            argnums=(0, 1, 2)))
        self._step = jax.jit(step)

        def step_vjp(w, images, labels, lr, idx, key, a):
            _, f = jax.vjp(lambda w_, im, lab, r: step(w_, im, lab, r, idx, key),
                           w, images, labels, lr)
            return f(a)

        self._vjp = jax.jit(step_vjp)

    def __call__(self, images, labels, lr, start, target, idx, keys):
        if self.loop == "scan":
            loss, grads = self._scan(images, labels, lr, start, target, idx, keys)
            return loss, grads
        ws = [start]
        for s in range(idx.shape[0]):
            ws.append(self._step(ws[-1], images, labels, lr, idx[s], keys[s]))
        diff = ws[-1] - target
        denom = jnp.sum((start - target) ** 2)
        loss = jnp.sum(diff ** 2) / denom
        a = 2.0 * diff / denom
        g_im = jnp.zeros_like(images)
        g_lab = jnp.zeros_like(labels)
        g_lr = jnp.zeros_like(lr)
        for s in reversed(range(idx.shape[0])):
            a, gi, gl, gr = self._vjp(ws[s], images, labels, lr, idx[s], keys[s], a)
            g_im, g_lab, g_lr = g_im + gi, g_lab + gl, g_lr + gr
        return loss, (g_im, g_lab, g_lr)


_MATCHERS: dict = {}


def _matcher_for(net, template, config: TMConfig) -> _Matcher:
    """A cached :class:`_Matcher`: runs with the same network and student settings share
    their compiled functions (a notebook or a test calls :func:`run` many times)."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    key = (net, treedef, tuple((x.shape, str(x.dtype)) for x in leaves), config.augment,
           config.soft_labels, config.resolved_loop(), jax.default_backend())
    if key not in _MATCHERS:
        if len(_MATCHERS) >= 8:
            _MATCHERS.pop(next(iter(_MATCHERS)))
        _MATCHERS[key] = _Matcher(net, template, config)
    return _MATCHERS[key]


def _minibatches(rng: np.random.Generator, n: int, batch: int, steps: int) -> np.ndarray:
    """(steps, batch) indices: consecutive chunks of fresh permutations (MTT's order)."""
    per = n // batch
    out, chunks = [], []
    for _ in range(steps):
        if not chunks:
            perm = rng.permutation(n)
            chunks = [perm[j * batch:(j + 1) * batch] for j in range(per)][::-1]
        out.append(chunks.pop())
    return np.stack(out).astype(np.int32)


def _draw(config: TMConfig, iteration: int, num_experts: int, n: int):
    """What iteration ``iteration`` uses: expert, start epoch, minibatches, augment keys."""
    rng = np.random.default_rng([config.seed, 2, iteration])
    lo, hi = start_epoch_window(config, iteration)
    expert = int(rng.integers(num_experts))
    start = int(rng.integers(lo, hi))
    batch = n if config.batch_syn is None else min(config.batch_syn, n)
    idx = _minibatches(rng, n, batch, config.syn_steps)
    keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(2**31))), config.syn_steps)
    return expert, start, hi, idx, keys


# ----------------------------------------------------------------- the step functions


class TMState(NamedTuple):
    """The state of a trajectory-matching run.

    Attributes:
      images: ``(n, H, W, C)`` synthetic images (model space).
      labels: ``(n, C)`` one-hot labels (MTT) or learned logits (DATM).
      lr: the student's learned learning rate (0-d).
      opt_state: ``dict(images=, lr=, labels=)``: the optax SGD-with-momentum states.
    """

    images: Any
    labels: Any
    lr: Any
    opt_state: dict


class TMBatch(NamedTuple):
    """What one iteration matches: an expert's segment and the student's minibatches.

    Attributes:
      start: the expert's flat parameters at ``start_epoch``.
      target: its flat parameters ``expert_epochs`` later.
      idx: ``(syn_steps, batch)`` synthetic-image indices of the student's minibatches.
      keys: ``(syn_steps,)`` augmentation keys.
      expert: the expert's index.
      start_epoch: the start epoch.
      window_hi: the upper end of the start-epoch window at this iteration.
    """

    start: Any
    target: Any
    idx: Any
    keys: Any
    expert: int
    start_epoch: int
    window_hi: int


def _optimizers(config: TMConfig):
    return (optax.sgd(config.lr_img, momentum=config.momentum_img),
            optax.sgd(config.lr_lr, momentum=config.momentum_lr),
            optax.sgd(config.lr_label, momentum=config.momentum_label))


def init(config: TMConfig, data: experts.TMData, trajectories: experts.Trajectories | None = None,
         *, initial: dict | None = None) -> TMState:
    """The starting :class:`TMState`: synthetic images and labels, the student lr, SGD states.

    Args:
      config: a :class:`TMConfig`.
      data: the experts' data (:func:`kipnb.experts.prepare`).
      trajectories: the experts (needed for ``init='correct'`` and soft labels).
      initial: ``dict(images=(C * ipc, H, W, C_in), labels=(C * ipc, C))`` to start from
        instead of ``config.init``.

    Returns:
      A :class:`TMState` (images class by class, ``ipc`` per class).

    Example:
      >>> d = experts.prepare("digits")  # doctest: +SKIP
      >>> s = init(TMConfig(ipc=1, init="noise"), d)  # doctest: +SKIP
      >>> s.images.shape, float(s.lr)  # doctest: +SKIP
      ((10, 8, 8, 1), 0.01)
    """
    C = data.num_classes
    if initial is None:
        classes = np.repeat(np.arange(C), config.ipc).astype(np.int32)
        images = init_synthetic(config, data, trajectories)
        labels = init_labels(config, images, classes, trajectories)
    else:
        images = np.asarray(initial["images"], np.float32)
        labels = np.asarray(initial["labels"], np.float32)
        if images.shape != (C * config.ipc, *data.image_shape) or labels.shape != (len(images), C):
            raise ValueError(
                f"initial images/labels must have shapes {(C * config.ipc, *data.image_shape)} "
                f"and {(C * config.ipc, C)}; got {images.shape} and {labels.shape}."
            )
    if config.batch_syn is not None and config.batch_syn > len(images):
        raise ValueError(
            f"batch_syn={config.batch_syn} exceeds the {len(images)} synthetic images.")
    opt_img, opt_lr, opt_lab = _optimizers(config)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    lr = jnp.asarray(config.lr_teacher, jnp.float32)
    return TMState(images, labels, lr, {"images": opt_img.init(images), "lr": opt_lr.init(lr),
                                        "labels": opt_lab.init(labels)})


def iteration_batch(config: TMConfig, trajectories: experts.Trajectories, iteration: int,
                    state: TMState) -> TMBatch:
    """What iteration ``iteration`` (0-based) matches: a function of ``(seed, iteration)``.

    Args:
      config: a :class:`TMConfig`.
      trajectories: the experts.
      iteration: the iteration index, 0-based.
      state: the current state (only the number of synthetic images is used).

    Returns:
      A :class:`TMBatch`.

    Example:
      >>> b = iteration_batch(cfg, traj, 0, state)  # doctest: +SKIP
      >>> b.idx.shape == (cfg.syn_steps, len(state.images))  # doctest: +SKIP
      True
    """
    expert, start_ep, hi, idx, keys = _draw(config, iteration, trajectories.num_experts,
                                            len(state.images))
    return TMBatch(jnp.asarray(trajectories.params[expert, start_ep]),
                   jnp.asarray(trajectories.params[expert, start_ep + config.expert_epochs]),
                   jnp.asarray(idx), keys, expert, start_ep, hi)


def update(config: TMConfig, trajectories: experts.Trajectories, state: TMState,
           batch: TMBatch) -> tuple[TMState, dict]:
    """One MTT/DATM iteration: unroll the student, the matching loss, SGD on images/lr/labels.

    Args:
      config: a :class:`TMConfig`.
      trajectories: the experts (their network).
      state: the current :class:`TMState`.
      batch: the iteration's :class:`TMBatch` (:func:`iteration_batch`).

    Returns:
      ``(new_state, metrics)``; ``metrics``: ``loss`` (before the update), ``start_epoch``,
      ``window_hi``, ``expert``, ``lr`` (the student lr after the update), ``skipped``
      (DATM's threshold) and ``finite`` (False: loss or gradient NaN/Inf, and the state
      is returned unchanged).

    Example:
      >>> batch = iteration_batch(cfg, traj, 0, state)  # doctest: +SKIP
      >>> state, metrics = update(cfg, traj, state, batch)  # doctest: +SKIP
    """
    matcher = _matcher_for(trajectories.net, trajectories.template, config)
    loss, (g_im, g_lab, g_lr) = matcher(state.images, state.labels, state.lr,
                                        batch.start, batch.target, batch.idx, batch.keys)
    loss = float(loss)
    finite = math.isfinite(loss) and all(bool(jnp.all(jnp.isfinite(g)))
                                         for g in (g_im, g_lab, g_lr))
    skipped = config.threshold is not None and loss > config.threshold
    new = state
    if finite and not skipped:
        opt_img, opt_lr, opt_lab = _optimizers(config)
        opt = dict(state.opt_state)
        u, opt["images"] = opt_img.update(g_im, opt["images"])
        images = optax.apply_updates(state.images, u)
        u, opt["lr"] = opt_lr.update(g_lr, opt["lr"])
        lr = optax.apply_updates(state.lr, u)
        labels = state.labels
        if config.soft_labels:
            u, opt["labels"] = opt_lab.update(g_lab, opt["labels"])
            labels = optax.apply_updates(state.labels, u)
        new = TMState(images, labels, lr, opt)
    return new, {"loss": loss, "start_epoch": batch.start_epoch, "window_hi": batch.window_hi,
                 "expert": batch.expert, "lr": float(new.lr), "skipped": bool(skipped),
                 "finite": finite}


# ---------------------------------------------------------------------------- the run


@dataclass(frozen=True, eq=False)
class TMResult:
    """What :func:`run` returns."""

    distilled: DistilledSet
    history: dict
    config: TMConfig
    images: np.ndarray  # model space
    labels: np.ndarray  # (n, C): one-hot, or DATM's logits
    lr: float  # the learned student learning rate
    evaluation: experts.EvalResult | None = None


def _empty_history() -> dict:
    return {"iteration": [], "loss": [], "start_epoch": [], "window_hi": [], "expert": [],
            "lr": [], "skipped": [], "eval_iteration": [], "test_acc": [], "test_std": [],
            "eval": [], "wall_time": []}


_FREE = ("iterations", "eval_every", "eval_at_end", "checkpoint_every")  # may change on resume


def _check(config: TMConfig, data: experts.TMData, traj: experts.Trajectories):
    E = traj.epochs
    if config.max_start_epoch - 1 + config.expert_epochs > E:
        raise ValueError(
            f"The experts were trained for {E} epochs, but start epochs up to "
            f"{config.max_start_epoch - 1} plus expert_epochs={config.expert_epochs} reach "
            f"epoch {config.max_start_epoch - 1 + config.expert_epochs}. Lower max_start_epoch "
            f"to <= {E - config.expert_epochs + 1} or train the experts for more epochs."
        )
    if config.label_epoch > E or config.label_epoch < -(E + 1):
        raise ValueError(f"label_epoch={config.label_epoch} is outside the experts' 0..{E}.")
    shape = tuple(traj.meta.get("image_shape", data.image_shape))
    if tuple(data.image_shape) != shape or traj.config.dataset != data.dataset:
        raise ValueError(
            f"The experts were trained on {traj.config.dataset} images of shape {shape}, "
            f"the data are {data.dataset} of shape {tuple(data.image_shape)}: train experts "
            "on these data (experts.train_experts)."
        )
    fp = traj.meta.get("fingerprint")
    if fp is not None and fp != data.fingerprint():
        raise ValueError(
            "The experts were trained on other training data (fingerprint mismatch: another "
            "preprocessing or subset?). Prepare the data with the experts' settings."
        )


def run(
    config: TMConfig,
    data: experts.TMData,
    trajectories: experts.Trajectories,
    *,
    checkpoint_dir=None,
    callback: Callable[[dict], Any] | None = None,
    progress: bool = True,
    initial: dict | None = None,
) -> TMResult:
    """Distill ``data`` by MTT or DATM against the experts' ``trajectories``.

    This is :func:`kipnb.loop.run` over the public step functions :func:`init`,
    :func:`iteration_batch` and :func:`update` (call those to own the loop).

    Args:
      config: a :class:`TMConfig`.
      data: the experts' data (:func:`kipnb.experts.prepare`).
      trajectories: :func:`kipnb.experts.train_experts` / ``load_trajectories``.
      checkpoint_dir: where ``tm_checkpoint.npz`` is written every
        ``config.checkpoint_every`` iterations and at the end; a checkpoint of the same
        run found there is resumed (exactly; a larger ``iterations`` continues a finished
        run), one of another run is refused and kept.
      callback: called after every iteration with a dict (``iteration``, ``loss``,
        ``start_epoch``, ``window_hi``, ``lr``, ``skipped``, ``last``, the current
        model-space ``images`` and ``labels``, and ``test_acc`` after an evaluation), e.g.
        :class:`kipnb.viz.LivePlot`, or a function keeping snapshots of the images.
      progress: tqdm progress bar.
      initial: ``dict(images=..., labels=...)`` to start from instead of ``init``.

    Returns a :class:`TMResult`; ``result.distilled`` (a :class:`DistilledSet`) has the
    model-space images with the data's fitted transform, the learned lr as ``lr``, and
    hard classes (MTT, ``label_kind='class'``) or DATM's logits (``'logits'``).
    """
    if not isinstance(config, TMConfig):
        raise TypeError(f"config must be a TMConfig, got {type(config).__name__}.")
    _check(config, data, trajectories)
    C = data.num_classes
    classes = np.repeat(np.arange(C), config.ipc).astype(np.int32)
    state = init(config, data, trajectories, initial=initial)
    cfg_dict = config.as_dict()
    fingerprint = f"{data.fingerprint()}/{trajectories.meta.get('fingerprint', '')}/" \
                  f"{trajectories.num_experts}x{trajectories.epochs}"
    last_eval: list = [None]

    def pack(s: TMState) -> dict:
        return {"state": {"images": s.images, "labels": s.labels, "lr": s.lr},
                "opt": s.opt_state}

    def unpack(tree: dict) -> TMState:
        tree = jax.tree_util.tree_map(jnp.asarray, tree)
        st = tree["state"]
        return TMState(st["images"], st["labels"], st["lr"], tree["opt"])

    def evaluate(s: TMState, it: int) -> dict:
        res = experts.evaluate(np.asarray(s.images), _eval_labels(config, s), data,
                               trajectories.net, lr=float(s.lr), config=config.evaluation)
        last_eval[0] = res
        return {"test_acc": res.mean, "test_std": res.std, "eval": dataclasses.asdict(res)}

    def nan_error(it: int, metrics: dict, kept: str) -> Exception:
        return TMNumericalError(
            f"{config.method.upper()} iteration {it}: the matching loss or its "
            f"gradient is NaN/Inf (loss={metrics['loss']}, student lr={metrics['lr']:.4g}); "
            f"the update was not applied. {kept} Fixes: lower lr_img (now "
            f"{config.lr_img:g}) or lr_lr (now {config.lr_lr:g}), or take fewer "
            f"syn_steps (now {config.syn_steps})."
        )

    def postfix(metrics: dict, history: dict) -> dict:
        post = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.4g}"}
        if history["test_acc"]:
            post["test_acc"] = f"{history['test_acc'][-1]:.4f}"
        return post

    user_callback = callback
    if callback is not None:
        def callback(info):  # noqa: F811 (the user's callback with images and labels)
            s = info.pop("state")
            return user_callback({**info, "images": s.images, "labels": s.labels})

    out = loop.run(
        state, functools.partial(update, config, trajectories), config.iterations,
        batch_fn=lambda it, s: iteration_batch(config, trajectories, it, s),
        history=_empty_history(), step_key="iteration",
        evaluate=evaluate, eval_every=config.eval_every, eval_at_end=config.eval_at_end,
        checkpoint_path=None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME,
        checkpoint_every=config.checkpoint_every, config=cfg_dict, fingerprint=fingerprint,
        free=_FREE, what="trajectory-matching", data_why="the data or the experts differ",
        pack=pack, unpack=unpack, nan_error=nan_error, callback=callback,
        progress_bar=progress, desc=config.method.upper(), postfix=postfix,
    )
    history, state = out.history, out.state
    if last_eval[0] is None and history["eval"] and history["eval_iteration"][-1] == out.step:
        e = history["eval"][-1]
        last_eval[0] = experts.EvalResult(**{**e, "accuracies": tuple(e["accuracies"]),
                                             "train_accuracy": tuple(e["train_accuracy"])})
    images_out = np.asarray(state.images, np.float32)
    labels_out = np.asarray(state.labels, np.float32)
    res = last_eval[0]
    distilled = DistilledSet(
        images=images_out,
        labels=labels_out if config.soft_labels else classes,
        label_kind="logits" if config.soft_labels else "class",
        num_classes=C,
        classes=classes,
        transform=data.transform,
        lr=float(state.lr),
        source={"method": config.method, "learner": dataclasses.asdict(trajectories.net),
                "config": {"tm": cfg_dict, "experts": dataclasses.asdict(trajectories.config)},
                "dataset": data.dataset, "ipc": config.ipc,
                "data_fingerprint": data.fingerprint()},
        extra={
            "iterations": config.iterations,
            "test_acc": None if res is None else res.mean,
            "test_std": None if res is None else res.std,
        },
    )
    return TMResult(distilled=distilled, history=history, config=config, images=images_out,
                    labels=labels_out, lr=float(state.lr), evaluation=res)


def _eval_labels(config: TMConfig, state: TMState) -> np.ndarray:
    labels = np.asarray(state.labels)
    return labels if config.soft_labels else labels.argmax(1).astype(np.int32)
