"""Expert trajectories and the evaluation of distilled sets, for trajectory matching (MTT, DATM).

Trajectory matching (Cazenavette et al. 2022, "MTT"; Guo et al. 2024, "DATM") needs two
things besides the distillation loop itself (:mod:`kipnb.tm`):

* **Expert trajectories.** Networks trained on the *real* training set, with their
  parameters saved after every epoch. The synthetic images are then learned so that a
  student trained on them for a few steps, starting from an expert's parameters at some
  epoch, lands near the same expert's parameters a few epochs later.
* **Evaluation.** A distilled set is judged by training fresh networks on it and
  measuring their accuracy on the real test set, averaged over several seeds.

Usage::

    data = prepare("fashion_mnist")                       # standardized, model space
    cfg = ExpertConfig(width=32, num_experts=5, epochs=8)
    traj = train_experts(cfg, data, "build/experts_fmnist")   # resumes if killed
    traj.params.shape        # (num_experts, epochs + 1, num_params)
    res = evaluate(images, labels, data, traj.net, lr=0.01)   # EvalResult
    print(res)               # "72.3 ± 0.4 % (5 seeds)"

    state = init(cfg, data, expert=0)                     # or own the loop (optax style)
    for epoch in range(cfg.epochs):
        state, metrics = update(cfg, data, state, epoch)  # ExpertState, dict
    np.stack(state.snapshots)                             # (epochs + 1, num_params)

Experts (MTT's ``buffer.py``)
-----------------------------
For each of ``num_experts`` experts: a fresh ConvNet (:class:`kipnb.nets.ConvNet`,
PyTorch-style initialization; MTT pads the first convolution by 3 for 1-channel images)
is trained for ``epochs`` epochs on the whole training set by SGD (MTT: ``lr_teacher =
0.01``, momentum 0, weight decay 0, batch 256, reshuffled every epoch, the last batch of
an epoch smaller), on softmax cross-entropy with the hard labels; every training batch is
augmented with DSA (:func:`kipnb.augment.augment`, MTT's
``'color_crop_cutout_flip_scale_rotate'``, a fresh random draw per image). The
*trajectory* is the list of the flat parameter vectors (:func:`kipnb.nets.flatten_params`
order) at initialization and after every epoch: ``epochs + 1`` snapshots. The test
accuracy is measured (without augmentation) after every epoch, as MTT logs it.
``lr_decay=True`` is MTT's ``--decay``: after the epoch with 0-based index
``epochs // 2 + 1`` the learning rate drops to a tenth and the momentum buffer is reset
(MTT builds a new optimizer there). :func:`init` (an :class:`ExpertState`) and
:func:`update` (one epoch) are the public step functions; :func:`train_experts` is
:func:`kipnb.loop.run` over them (the NaN stop, the callback) per expert, with the expert
files below as its checkpoints.

Files and resuming. ``train_experts(config, data, out_dir)`` writes one file per expert,
``out_dir/expert_000.npz``, ``expert_001.npz``, ... (:mod:`kipnb.checkpoint` format:
atomic writes, plain ``.npz``), rewritten after *every* epoch with the snapshots so far,
the momentum buffer, the epoch count, the per-epoch history and a JSON ``meta`` with the
config and a fingerprint of the training data. Running it again with the same config and
data resumes: finished experts are skipped, an unfinished one continues from its last
saved epoch. Every random draw is derived from ``(seed, expert, epoch)`` -- the
initialization from ``(seed, expert)``, the shuffle of an epoch from
``numpy.random.default_rng([seed, 0, expert, epoch])``, the augmentation of step ``s``
from ``fold_in(fold_in(fold_in(PRNGKey(seed), expert), 1 + epoch), s)`` -- so an
interrupted and resumed run ends with exactly the same arrays as an uninterrupted one (on
the same machine and JAX version). Raising ``num_experts`` later adds experts; any other
config change, or other data, in a directory that holds experts is refused with an error
naming the differing fields. Nothing here deletes or overwrites a file of another run.
:func:`load_trajectories` reads a directory back.

Evaluation (MTT's ``utils.evaluate_synset``)
--------------------------------------------
:func:`evaluate` trains ``num_seeds`` freshly initialized networks on the distilled
images with SGD (momentum 0.9, weight decay 5e-4, exactly as ``torch.optim.SGD``:
``g += wd * p; buf = m * buf + g; p -= lr * buf``), learning rate = the learned
synthetic learning rate, minibatches of ``batch_size`` (MTT 256, DATM 128) reshuffled
every epoch, DSA augmentation on every batch, and reports the accuracy of the final
network on the whole test set: mean, population standard deviation (``np.std``) and the
list. Labels are integer classes (cross-entropy) or, as DATM learns them, soft-label
*logits* ``(N, C)``: the loss is then ``mean_i sum_c -log_softmax(out_i)_c *
softmax(label_i)_c``. The learning rate drops to a tenth, and the momentum buffer is
reset, after the epoch with 0-based index ``epochs // 2 + 1`` (MTT's ``lr_schedule``).
One difference: MTT's loop is ``for ep in range(Epoch + 1)``, one epoch more than it
says; here ``epochs`` epochs are trained (``EvalConfig(epochs=1001)`` is MTT's 1000,
including the decay point). Checked in MTT's own code (GeorgeCazenavette/mtt-distillation,
``utils.py`` ``evaluate_synset`` at commit 0c42493: ``Epoch = int(args.epoch_eval_train)``,
``lr_schedule = [Epoch//2+1]``, ``for ep in tqdm.tqdm(range(Epoch+1))``, with
``epoch_eval_train=1000`` in ``distill.py``), so the CIFAR settings of
``tm.PARAMETER_SETS`` evaluate with ``epochs=1001``.

Speed. One jit-compiled SGD step of the finite-network trainer
(:func:`kipnb.train.make_step`: gather the minibatch by index from the data kept on the
device, augment, forward, backward, the optax update of
:func:`kipnb.train.make_optimizer`'s torch-exact SGD) is shared by experts and evaluation
and called from a Python loop (on CPU faster for ConvNets than a ``lax.scan``); the host
waits for the device once per epoch (experts) or every 50 epochs (evaluation). XLA's CPU
backend computes the kernel gradient of a convolution with very few input channels (the
first layer on 1- or 3-channel images) slowly: for Fashion-MNIST's first layer 150-440
ms per batch of 256, more than all the rest of the step, against ~25 ms as a matrix
product of image patches. :func:`apply_fn` gives ``net.apply`` with the same forward
pass and that one gradient computed the second way (width 32: the step is about twice
as fast). On Linux, :func:`reuse_host_memory` called
before JAX's first computation (or the equivalent ``MALLOC_*`` environment variables)
saves another ~40 % of CPU time by stopping glibc from unmapping and page-faulting XLA's
scratch memory on every step. Measured on a shared 2-core VM, one epoch of a width-32
expert on Fashion-MNIST (235 steps + the test set) takes about 72 s of CPU time, 42 s
with :func:`reuse_host_memory`; wall time is about half that when both cores are free.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kipnb import augment as augment_lib
from kipnb import checkpoint, loop, nets, preprocess, train
from kipnb import data as data_lib
from kipnb.checkpoint import CheckpointError
from kipnb.checks import is_int as _is_int

__all__ = [
    "PREPROCESSING",
    "CheckpointError",
    "EvalConfig",
    "EvalResult",
    "ExpertConfig",
    "ExpertState",
    "TMData",
    "TrainingDivergedError",
    "Trajectories",
    "apply_fn",
    "evaluate",
    "expert_path",
    "init",
    "load_trajectories",
    "prepare",
    "reuse_host_memory",
    "train_experts",
    "update",
]

FORMAT = "kipnb.experts"
FORMAT_VERSION = 1
#: Preprocessings of :func:`prepare` / :class:`ExpertConfig` (:func:`kipnb.data.prepare`
#: names; ``'zca_kornia'`` is MTT's and DATM's ZCA, ``'zca'`` is refused as ambiguous).
PREPROCESSING = ("standardize", "zca_kornia", "none")
HIGHEST = jax.lax.Precision.HIGHEST
_SYNC_EVERY = 50  # evaluation: epochs between host syncs (NaN check, progress bar)
# Fields that may differ between the experts in a directory and a run adding to them.
_FREE_FIELDS = {"num_experts"}
_NAME = re.compile(r"expert_(\d{3,})\.npz")


class TrainingDivergedError(FloatingPointError):
    """A training loss (expert or evaluation network) became NaN or infinite."""


def _is_real(v) -> bool:
    return (isinstance(v, int | float | np.number) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def _check_strategy(owner: str, v) -> None:
    try:
        augment_lib.strategy_groups(v)
    except ValueError as e:
        raise ValueError(f"{owner}.augment={v!r}: {e}") from None


# -------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ExpertConfig:
    """How the experts are trained (frozen; ``dataclasses.replace`` to vary).

    Attributes:
      dataset: a :mod:`kipnb.data` name; must equal the ``dataset`` of the data.
      width, depth, norm: the ConvNet (MTT: width 128, depth 3, instance norm; the
        narrower default keeps CPU runs short).
      num_experts: experts to train (MTT: 100).
      epochs: epochs per expert (MTT: 50); a trajectory has ``epochs + 1`` snapshots.
      lr, momentum, weight_decay: SGD as ``torch.optim.SGD`` (MTT: 0.01, 0, 0).
      batch_size: training images per step (MTT: 256).
      augment: DSA strategy (:func:`kipnb.augment.augment`); ``'none'`` turns it off.
      lr_decay: MTT's ``--decay`` (lr / 10 after epoch ``epochs // 2 + 1``).
      preprocessing: ``'standardize'`` (per-channel mean/std), ``'zca_kornia'`` (MTT's
        and DATM's CIFAR setting: kornia's ZCA with ``eps = zca_reg`` on [0, 1] pixels)
        or ``'none'`` (:func:`kipnb.data.prepare` names; ``'zca'``, KIP's relative ZCA, is
        refused as ambiguous: files written before it was renamed read as
        ``'zca_kornia'``).
      zca_reg: the ZCA regularizer (MTT: 0.1).
      seed: all random draws (initializations, shuffles, augmentations).
    """

    dataset: str = "fashion_mnist"
    width: int = 32
    depth: int = 3
    norm: str = "instancenorm"
    num_experts: int = 3
    epochs: int = 6
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    augment: str = augment_lib.DEFAULT_STRATEGY
    lr_decay: bool = False
    preprocessing: str = "standardize"
    zca_reg: float = 0.1
    seed: int = 0

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"ExpertConfig.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.dataset, str) or not self.dataset:
            bad("dataset", f"use a dataset name ({', '.join(data_lib.DATASETS)}).")
        for name in ("width", "depth", "num_experts", "epochs", "batch_size"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                bad(name, "must be a positive integer.")
        if self.norm not in nets.STATELESS_NORMS:
            bad("norm", f"use one of {list(nets.STATELESS_NORMS)} (trajectory matching "
                        "differentiates through training: no running statistics).")
        if not (_is_real(self.lr) and self.lr > 0):
            bad("lr", "must be a positive number (MTT's experts use 0.01).")
        if not (_is_real(self.momentum) and 0 <= self.momentum < 1):
            bad("momentum", "must lie in [0, 1) (MTT's experts use 0).")
        if not (_is_real(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "must be a number >= 0 (MTT's experts use 0).")
        _check_strategy("ExpertConfig", self.augment)
        if not isinstance(self.lr_decay, bool):
            bad("lr_decay", "must be True or False.")
        _check_preprocessing("ExpertConfig.preprocessing", self.preprocessing)
        if not (_is_real(self.zca_reg) and self.zca_reg > 0):
            bad("zca_reg", "must be a positive number (MTT: 0.1).")
        if not (_is_int(self.seed) and 0 <= self.seed < 2**32):
            bad("seed", "must be an integer in [0, 2**32).")

    def net(self, image_shape, num_classes: int) -> nets.ConvNet:
        """The experts' ConvNet for images of ``image_shape`` (H, W, C).

        As MTT, the first convolution pads by 3 for 1-channel images (28x28 -> 32x32
        feature maps), by 1 otherwise.
        """
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {image_shape!r}.")
        net = nets.ConvNet(width=self.width, depth=self.depth, norm=self.norm,
                           num_classes=int(num_classes),
                           first_padding=3 if shape[2] == 1 else 1)
        net.feature_shape(shape)  # raises if the images are too small for depth
        return net

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 0-based ``epoch`` (MTT: decayed after ``epochs//2 + 1``)."""
        decayed = self.lr_decay and epoch > self.epochs // 2 + 1
        return float(self.lr) * (0.1 if decayed else 1.0)


@dataclass(frozen=True)
class EvalConfig:
    """How :func:`evaluate` trains networks on a distilled set (MTT's evaluate_synset).

    Attributes:
      epochs: training epochs per network (MTT: 1000 (+1, see the module docstring);
        300 is a quicker default).
      batch_size: distilled images per step (MTT: 256; DATM: 128).
      momentum, weight_decay: SGD's (MTT: 0.9, 5e-4).
      augment: DSA strategy for every batch; ``'none'`` turns it off.
      num_seeds: networks trained (MTT: 5); network ``i`` is initialized from
        ``fold_in(PRNGKey(seed), i)``.
      seed: base seed.
    """

    epochs: int = 300
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = augment_lib.DEFAULT_STRATEGY
    num_seeds: int = 5
    seed: int = 0

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"EvalConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("epochs", "batch_size", "num_seeds"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                bad(name, "must be a positive integer.")
        if not (_is_real(self.momentum) and 0 <= self.momentum < 1):
            bad("momentum", "must lie in [0, 1) (MTT: 0.9).")
        if not (_is_real(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "must be a number >= 0 (MTT: 5e-4).")
        _check_strategy("EvalConfig", self.augment)
        if not (_is_int(self.seed) and 0 <= self.seed < 2**32):
            bad("seed", "must be an integer in [0, 2**32).")

    def lr_at(self, lr: float, epoch: int) -> float:
        """The learning rate of 0-based ``epoch``: ``lr``, a tenth after ``epochs//2 + 1``."""
        return float(lr) * (0.1 if epoch > self.epochs // 2 + 1 else 1.0)


@dataclass(frozen=True)
class EvalResult:
    """Test accuracies (fractions in [0, 1]) of the networks trained by :func:`evaluate`.

    ``mean`` and ``std`` (population, ``np.std``) over ``accuracies``; ``train_accuracy``:
    each network's accuracy on the (augmented) training batches of its last epoch, as
    MTT reports it; ``seconds``: wall time of the whole evaluation.
    """

    mean: float
    std: float
    accuracies: tuple[float, ...]
    train_accuracy: tuple[float, ...]
    seconds: float

    def __str__(self) -> str:
        n = len(self.accuracies)
        return f"{100 * self.mean:.1f} ± {100 * self.std:.1f} % ({n} seed{'s' * (n != 1)})"


# ----------------------------------------------------------------------------- data


#: The experts' data: :class:`kipnb.data.Data` (one data type for every method).
TMData = data_lib.Data


def _make_transform(preprocessing: str, zca_reg: float) -> preprocess.Pipeline:
    _check_preprocessing("preprocessing", preprocessing)
    return preprocess.make(preprocessing, zca_reg=zca_reg)


def _check_preprocessing(owner: str, preprocessing) -> None:
    if preprocessing == "zca":
        raise ValueError(
            f"{owner}='zca' is ambiguous: MTT's and DATM's ZCA (kornia's, absolute eps = "
            f"zca_reg on the [0, 1] pixels; what 'zca' meant for the experts before) is now "
            f"'zca_kornia'; KIP's trace-relative ZCA is 'zca' in kipnb.data.prepare. Use "
            f"preprocessing='zca_kornia' for the papers' CIFAR setting."
        )
    if preprocessing not in PREPROCESSING:
        raise ValueError(
            f"{owner}={preprocessing!r}: use one of {list(PREPROCESSING)}."
        )


def prepare(
    dataset: str = "fashion_mnist",
    *,
    preprocessing: str = "standardize",
    zca_reg: float = 0.1,
    data_dir=None,
    n_train: int | None = None,
    n_test: int | None = None,
) -> TMData:
    """:func:`kipnb.data.prepare` restricted to the experts' preprocessings.

    ``preprocessing``: ``'standardize'``, ``'zca_kornia'`` (MTT's and DATM's CIFAR
    setting) or ``'none'``; ``'zca'`` is refused as ambiguous (the error names both
    ZCAs).
    """
    _check_preprocessing("preprocessing", preprocessing)
    return data_lib.prepare(dataset, preprocessing, zca_reg=zca_reg, data_dir=data_dir,
                            n_train=n_train, n_test=n_test)


# ------------------------------------------------------------ the SGD step (kipnb.train)


def _loss_kind(y) -> str:
    """Hard labels ``(B,)``: ``'xent'``; soft-label logits ``(B, C)``: ``'logit_xent'``."""
    return "logit_xent" if y.ndim == 2 else "xent"


@functools.lru_cache(maxsize=32)
def _step_for(net, strategy: str, loss: str):
    """The trainer's jitted step for ``net`` (:func:`apply_fn`), compiled once per network,
    DSA strategy and loss; SGD's hyperparameters are read from the state."""
    return train.make_step(apply_fn(net), loss, _SGD, augment=strategy)


#: The experts' and evaluation's optimizer (torch.optim.SGD); its lr, momentum and weight
#: decay live in each TrainState.
_SGD = train.make_optimizer("sgd", 0.01)


def _sgd_state(params, lr: float, momentum: float, weight_decay: float) -> train.TrainState:
    opt = train.make_optimizer("sgd", lr, momentum=momentum, weight_decay=weight_decay)
    return train.init(params, opt)


def apply_fn(net) -> Callable:
    """``net.apply`` for training: the same function, with faster gradients on CPU.

    For a :class:`kipnb.nets.ConvNet`: ``net.apply(..., conv='patch_grad')`` -- the same
    forward pass, with the kernel gradient of a first convolution with at most 4 input
    channels computed as a matrix product of image patches (see the module docstring).
    Other networks: ``net.apply`` itself.
    """
    if isinstance(net, nets.ConvNet):
        return functools.partial(net.apply, conv="patch_grad")
    return net.apply


@functools.partial(jax.jit, static_argnames=("net",))
def _count_correct(params, x, y, *, net):
    return jnp.sum(jnp.argmax(net.apply(params, x), axis=-1) == y)


def _test_accuracy(net, params, d: TMData) -> jax.Array:
    """Test accuracy on the whole test set (blocks of up to 1000 images); a device scalar."""
    dev = d.device()
    block, x, y = dev["block"], dev["x_test"], dev["y_test"]
    correct = [_count_correct(params, x[s:s + block], y[s:s + block], net=net)
               for s in range(0, x.shape[0], block)]
    return jnp.sum(jnp.stack(correct)) / len(d.x_test)


def reuse_host_memory() -> bool:
    """Make glibc keep and reuse freed host memory; call it before JAX's first computation.

    XLA:CPU allocates each execution's scratch memory afresh (~240 MB for one training
    step of a width-32 ConvNet on 256 Fashion-MNIST images) on a worker thread; glibc
    serves blocks that large with ``mmap`` and returns them with ``munmap``, so every
    step page-faults all of it in again (about 60,000 faults, ~40 % of the step's CPU time
    on a 2-core VM). This sets ``mallopt(M_ARENA_MAX=1, M_MMAP_MAX=0,
    M_TRIM_THRESHOLD=2**31 - 1)`` -- the same as starting Python with
    ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` -- so large
    blocks come from the heap and stay mapped (the process keeps its peak memory).
    Results are unchanged (bit for bit).

    It only helps fully if it runs before JAX starts its CPU backend (threads that have
    already allocated keep their own arenas). Returns True if it was applied in time,
    False if not applicable (not glibc) or too late (the settings are still applied).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    ok = all(mallopt(opt, val) == 1 for opt, val in (
        (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))
    try:
        from jax._src import xla_bridge

        late = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        late = False
    return ok and not late


@functools.partial(jax.jit, static_argnames=("net", "shape"))
def _init(key, *, net, shape):
    """``net.init(key, shape)``, compiled once per network (the same values as eager)."""
    return net.init(key, shape)


def _zeros_like(params):
    return jax.tree_util.tree_map(jnp.zeros_like, params)


# -------------------------------------------------------------------------- experts


def expert_path(out_dir, expert: int) -> Path:
    """``out_dir / 'expert_{expert:03d}.npz'``."""
    return Path(out_dir) / f"expert_{int(expert):03d}.npz"


@dataclass(frozen=True, eq=False)
class Trajectories:
    """Expert trajectories: ``params[i, e]`` is expert ``i``'s flat parameter vector after
    ``e`` epochs (``e = 0``: initialization), in :func:`kipnb.nets.flatten_params` order.

    Attributes:
      params: ``(num_experts, epochs + 1, num_params)`` float32.
      config: the :class:`ExpertConfig` the experts were trained with.
      net: their :class:`kipnb.nets.ConvNet`.
      template: a parameter pytree of the right structure (for
        :func:`kipnb.nets.unflatten_params`).
      test_accuracy: ``(num_experts, epochs)`` test accuracy after each epoch.
      meta: ``fingerprint`` (of the training data, :meth:`TMData.fingerprint`),
        ``dataset``, ``image_shape``, ``num_classes``, ``num_params``, ``experts`` (the
        expert indices loaded), ``train_loss`` / ``train_accuracy`` (lists per expert and
        epoch), ``seconds`` (training time per expert), ``out_dir``.
    """

    params: np.ndarray
    config: ExpertConfig
    net: nets.ConvNet
    template: dict
    test_accuracy: np.ndarray
    meta: dict

    @property
    def num_experts(self) -> int:
        return int(self.params.shape[0])

    @property
    def epochs(self) -> int:
        return int(self.params.shape[1]) - 1

    @property
    def num_params(self) -> int:
        return int(self.params.shape[2])

    def params_at(self, expert: int, epoch: int) -> dict:
        """Expert ``expert``'s parameter pytree after ``epoch`` epochs."""
        return nets.unflatten_params(jnp.asarray(self.params[expert, epoch]), self.template)


def _config_dict(config: ExpertConfig) -> dict:
    return dataclasses.asdict(config)


def _config_diff(a: dict, b: dict, a_name: str = "there", b_name: str = "here") -> list[str]:
    return checkpoint.config_diff(a, b, _FREE_FIELDS, (a_name, b_name))


def _expert_files(out_dir: Path) -> dict[int, Path]:
    if not out_dir.is_dir():
        return {}
    found = {}
    for p in out_dir.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def _read_meta(path: Path) -> dict:
    meta = checkpoint.read_meta(path)  # CheckpointError naming the file if unreadable
    if isinstance(meta.get("config"), dict) and meta["config"].get("preprocessing") == "zca":
        meta["config"]["preprocessing"] = "zca_kornia"  # written before the rename
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(
            f"{path} is not a kipnb expert file (no '{FORMAT}' meta). It was left in place; "
            f"keep expert directories for experts only."
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer kipnb (format {meta['format_version']}); "
            f"upgrade kipnb to read it."
        )
    return meta


def _config_from(saved: dict) -> ExpertConfig:
    known = {f.name for f in dataclasses.fields(ExpertConfig)}
    return ExpertConfig(**{k: v for k, v in saved.items() if k in known})


def _template(config: ExpertConfig, image_shape, num_classes: int):
    net = config.net(image_shape, num_classes)
    return net, _init(jax.random.PRNGKey(0), net=net, shape=tuple(image_shape))


def _load_state(path: Path, meta: dict) -> dict:
    k, p = int(meta["epochs_done"]), int(meta["num_params"])
    template = {"momentum": np.zeros((p,), np.float32),
                "snapshots": np.zeros((k + 1, p), np.float32)}
    state, _ = checkpoint.load(path, template)
    return state


def _mismatch_error(out_dir: Path, path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{out_dir} already holds experts of another run ({path.name}: {why}). Use another "
        f"out_dir, or move those files away (they were left in place)."
    )


_HISTORY = ("train_loss", "train_accuracy", "test_accuracy")


class ExpertState(NamedTuple):
    """One expert during training: what :func:`init` makes and :func:`update` advances.

    Attributes:
      expert: the expert's index (its random draws derive from ``(seed, expert)``).
      params: the network's parameter pytree now.
      momentum: SGD's momentum buffer (a pytree like ``params``; zeros while
        ``momentum=0``, MTT's setting).
      snapshots: the trajectory so far: a list of flat float32 parameter vectors
        (:func:`kipnb.nets.flatten_params` order), the initialization and one per epoch.
      history: ``train_loss``, ``train_accuracy``, ``test_accuracy``: lists, one entry
        per epoch done.
    """

    expert: int
    params: Any
    momentum: Any
    snapshots: list
    history: dict

    @property
    def epochs_done(self) -> int:
        """Epochs trained so far (``len(snapshots) - 1``): the 0-based epoch to train next."""
        return len(self.snapshots) - 1


def _check_data(config: ExpertConfig, data: TMData) -> None:
    if not isinstance(config, ExpertConfig):
        raise TypeError(f"config must be an ExpertConfig, got {type(config).__name__}.")
    if not isinstance(data, TMData):
        raise TypeError(f"data must be a TMData (experts.prepare), got {type(data).__name__}.")
    if data.dataset != config.dataset:
        raise ValueError(
            f"The data are {data.dataset!r} but config.dataset is {config.dataset!r}: prepare "
            f"the data for this config (experts.prepare(config.dataset, ...)), or set "
            f"ExpertConfig(dataset={data.dataset!r})."
        )
    if data.transform is not None and hasattr(data.transform, "recipe"):
        want = _make_transform(config.preprocessing, config.zca_reg).recipe()
        if data.transform.recipe() != want:
            raise ValueError(
                f"The data were preprocessed as {data.transform.recipe()} but "
                f"config.preprocessing={config.preprocessing!r} means {want}: prepare the "
                f"data with preprocessing={config.preprocessing!r} (and zca_reg), or change "
                f"the config."
            )


def init(config: ExpertConfig, data: TMData, expert: int) -> ExpertState:
    """Expert ``expert`` before training: a fresh ConvNet and its zero momentum buffer.

    The initialization is drawn from ``fold_in(fold_in(PRNGKey(config.seed), expert),
    0)``, as :func:`train_experts` does; ``snapshots`` holds it as the trajectory's epoch
    0. With :func:`update` this is the public step pair under :func:`train_experts`
    (which adds the expert files, resuming, the NaN stop and the progress bar through
    :func:`kipnb.loop.run`).

    Args:
      config: an :class:`ExpertConfig` (its ``dataset`` and ``preprocessing`` must match
        the data's).
      data: the training data (:func:`prepare`, :func:`kipnb.data.prepare`).
      expert: the expert's index, an integer >= 0.

    Returns:
      An :class:`ExpertState` with ``epochs_done == 0``.

    Raises:
      ValueError: the data do not fit the config, or a bad ``expert``.

    Example:
      >>> from kipnb import data
      >>> d = data.prepare("digits", "standardize", n_train=64, n_test=32)
      >>> cfg = ExpertConfig(dataset="digits", width=4, depth=2, epochs=2, batch_size=32)
      >>> s = init(cfg, d, expert=0)
      >>> s.epochs_done, s.snapshots[0].shape == (nets.count_params(s.params),)
      (0, True)
    """
    _check_data(config, data)
    if not (_is_int(expert) and expert >= 0):
        raise ValueError(f"expert must be an integer >= 0, got {expert!r}.")
    net = config.net(data.image_shape, data.num_classes)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), expert), 0)
    params = _init(key, net=net, shape=data.image_shape)
    return ExpertState(expert=int(expert), params=params, momentum=_zeros_like(params),
                       snapshots=[np.asarray(nets.flatten_params(params), np.float32)],
                       history={k: [] for k in _HISTORY})


def update(config: ExpertConfig, data: TMData, state: ExpertState,
           epoch: int) -> tuple[ExpertState, dict]:
    """Train the expert for one epoch (0-based ``epoch``, which must be
    ``state.epochs_done``): one pass of :func:`kipnb.train.epoch` over the whole training
    set.

    SGD (``torch.optim.SGD``) with ``config.lr_at(epoch)``, the momentum buffer carried
    over from ``state``; the epoch's shuffle is ``default_rng([seed, 0, expert, epoch])``
    and its DSA keys derive from ``fold_in(fold_in(PRNGKey(seed), expert), 1 + epoch)``.
    With ``lr_decay``, the momentum buffer is reset after epoch ``epochs // 2 + 1`` (MTT
    builds a new optimizer there). The host waits for the device once (losses, snapshot,
    test accuracy). ``state`` is not changed.

    Args:
      config: the :class:`ExpertConfig`.
      data: the training data (the test set gives ``test_accuracy``).
      state: the expert after ``epoch`` epochs (:func:`init`, or a previous update).
      epoch: the 0-based epoch to train.

    Returns:
      ``(state, metrics)``: the expert after ``epoch + 1`` epochs (one more snapshot and
      history entry) and a dict of ``train_loss`` (the mean over the epoch's images),
      ``train_accuracy`` (on the augmented batches), ``test_accuracy``, ``lr`` and
      ``finite`` (False: a loss or parameter became NaN/Inf; then ``diverged`` says
      which, and the state returned is ``state`` unchanged: stop there).

    Example:
      >>> from kipnb import data
      >>> d = data.prepare("digits", "standardize", n_train=64, n_test=32)
      >>> cfg = ExpertConfig(dataset="digits", width=4, depth=2, epochs=2, batch_size=32)
      >>> s = init(cfg, d, expert=0)
      >>> for e in range(cfg.epochs):
      ...     s, m = update(cfg, d, s, e)
      >>> s.epochs_done, len(s.snapshots), m["finite"], 0 <= m["test_accuracy"] <= 1
      (2, 3, True, True)
    """
    if not isinstance(state, ExpertState):
        raise TypeError(f"state must be an ExpertState (experts.init), got "
                        f"{type(state).__name__}.")
    if not (_is_int(epoch) and epoch == state.epochs_done):
        raise ValueError(f"epoch={epoch!r}: this state has done {state.epochs_done} epochs, "
                         f"so the next epoch to train is {state.epochs_done} (0-based).")
    if epoch >= config.epochs:
        raise ValueError(f"epoch={epoch}: the config trains {config.epochs} epochs (0 .. "
                         f"{config.epochs - 1}).")
    net = config.net(data.image_shape, data.num_classes)
    dev = data.device()
    x, y = dev["x_train"], dev["y_train"]
    n = len(data.x_train)
    lr = config.lr_at(epoch)
    perm = np.random.default_rng([config.seed, 0, state.expert, epoch]).permutation(n)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), state.expert),
                             1 + epoch)
    ts = train.with_momentum(
        _sgd_state(state.params, lr, config.momentum, config.weight_decay), state.momentum)
    ts, losses, correct, sizes = train.epoch(
        _step_for(net, config.augment, _loss_kind(y)), ts, x, y, perm, key,
        batch_size=config.batch_size)
    params, buf = ts.params, train.momentum(ts)
    flat = nets.flatten_params(params)
    test_acc = _test_accuracy(net, params, data)
    losses, correct, flat, test_acc = jax.device_get(
        (jnp.stack(losses), jnp.stack(correct), flat, test_acc))
    sizes = np.asarray(sizes)
    train_loss = float(np.sum(losses * sizes) / n)
    train_acc = float(np.sum(correct) / n)
    metrics = {"train_loss": train_loss, "train_accuracy": train_acc,
               "test_accuracy": float(test_acc), "lr": lr}
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size or not np.all(np.isfinite(flat)):
        return state, {**metrics, "finite": False, "diverged": (
            f"the training loss became {losses[bad[0]]} at step {bad[0] + 1}" if bad.size
            else "the parameters became NaN/Inf")}
    if config.lr_decay and epoch == config.epochs // 2 + 1:
        buf = _zeros_like(buf)  # MTT builds a new optimizer here
    history = {k: [*state.history[k], metrics[k]] for k in _HISTORY}
    new = ExpertState(expert=state.expert, params=params, momentum=buf,
                      snapshots=[*state.snapshots, np.asarray(flat, np.float32)],
                      history=history)
    return new, {**metrics, "finite": True}


def train_experts(
    config: ExpertConfig,
    data: TMData,
    out_dir,
    *,
    progress: bool = True,
    callback: Callable[[int, int, dict], Any] | None = None,
) -> Trajectories:
    """Train ``config.num_experts`` experts on ``data`` (see the module docstring).

    Writes ``out_dir/expert_000.npz``, ... after every epoch and resumes from them when
    called again with the same config and data. ``callback(expert, epoch, info)`` runs
    after each epoch has been saved (``epoch``: epochs done, 1-based; ``info``:
    ``train_loss``, ``train_accuracy``, ``test_accuracy``, ``lr``, ``seconds``, ``path``).
    ``progress``: a tqdm bar over experts x epochs.

    Returns the :class:`Trajectories` of experts ``0 .. num_experts - 1``.

    Raises:
      CheckpointError: ``out_dir`` holds experts of another config or other data, or an
        unreadable expert file (named; nothing is deleted or overwritten).
      TrainingDivergedError: the loss became NaN/Inf (names the expert and epoch; that
        epoch is not saved).
    """
    _check_data(config, data)
    out_dir = Path(out_dir)
    cfg_dict = _config_dict(config)
    fingerprint = data.fingerprint()
    image_shape, C = data.image_shape, data.num_classes
    net, template = _template(config, image_shape, C)
    P = nets.count_params(template)

    # Check every expert file already there before touching anything.
    existing = _expert_files(out_dir)
    metas = {}
    for i, path in existing.items():
        meta = _read_meta(path)
        diff = _config_diff(meta["config"], cfg_dict)
        if diff:
            raise _mismatch_error(out_dir, path, "; ".join(diff))
        if meta.get("fingerprint") != fingerprint:
            raise _mismatch_error(
                out_dir, path, f"trained on other data (fingerprint {meta.get('fingerprint')}, "
                f"these data {fingerprint}); same config, different training images")
        metas[i] = meta

    E = config.epochs
    done_before = sum(min(int(metas[i]["epochs_done"]), E) if i in metas else 0
                      for i in range(config.num_experts))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.num_experts * E, initial=done_before, desc="experts")
    try:
        for i in range(config.num_experts):
            path = expert_path(out_dir, i)
            if i in metas:
                if int(metas[i]["epochs_done"]) >= E:
                    continue
                state = _resume(path, metas[i], template, i)
                seconds = [float(metas[i].get("seconds", 0.0))]
            else:
                state = init(config, data, i)
                seconds = [0.0]
            _train_one(config, data, state, path, seconds, bar, callback, {
                "config": cfg_dict, "fingerprint": fingerprint, "dataset": data.dataset,
                "image_shape": list(image_shape), "num_classes": C, "num_params": P,
                "net": dataclasses.asdict(net)})
    finally:
        if bar is not None:
            bar.close()
    return _load(out_dir, experts=list(range(config.num_experts)), complete_only=True)


def _resume(path: Path, meta: dict, template, expert: int) -> ExpertState:
    """The :class:`ExpertState` saved in ``path`` (its last epoch, the momentum buffer)."""
    saved = _load_state(path, meta)
    snapshots = list(saved["snapshots"])
    return ExpertState(
        expert=expert,
        params=nets.unflatten_params(jnp.asarray(snapshots[-1]), template),
        momentum=nets.unflatten_params(jnp.asarray(saved["momentum"]), template),
        snapshots=snapshots,
        history={k: list(meta[k]) for k in _HISTORY})


def _train_one(config: ExpertConfig, data: TMData, state: ExpertState, path: Path,
               seconds: list, bar, callback, meta: dict) -> ExpertState:
    """The remaining epochs of one expert: :func:`kipnb.loop.run` over :func:`update`,
    the expert file rewritten after every epoch (the loop's own checkpoint is not used:
    the file format is the experts', with the growing snapshots); ``meta``: the file's
    fixed meta (config, fingerprint, shapes, net)."""
    i, E, start = state.expert, config.epochs, state.epochs_done

    def timed_update(s: ExpertState, epoch: int):
        t0 = time.perf_counter()
        out = update(config, data, s, epoch)
        seconds[0] += time.perf_counter() - t0
        return out

    def nan_error(step: int, metrics: dict, kept: str) -> Exception:
        e, lr = start + step - 1, metrics["lr"]  # step: 1-based in this session
        kept = (f"{path} keeps the last good epoch ({e})" if e > 0
                else "nothing was saved for this expert")
        return TrainingDivergedError(
            f"Expert {i}, epoch {e + 1}/{E}: {metrics['diverged']} (lr={lr:g}): training "
            f"diverged. Lower ExpertConfig.lr (e.g. {lr / 10:g}); {kept}."
        )

    def save_epoch(info: dict) -> None:
        s = info["state"]
        done = s.epochs_done
        checkpoint.save(path, {"momentum": np.asarray(nets.flatten_params(s.momentum)),
                               "snapshots": np.stack(s.snapshots)},
                        {"format": FORMAT, "format_version": FORMAT_VERSION, "expert": i,
                         "epochs_done": done, "complete": done == E, **meta,
                         "seconds": seconds[0], **s.history})
        if bar is not None:
            bar.update(1)
            bar.set_postfix({"expert": i, "loss": f"{info['train_loss']:.3f}",
                             "train_acc": f"{info['train_accuracy']:.3f}",
                             "test_acc": f"{info['test_accuracy']:.3f}"}, refresh=False)
        if callback is not None:
            callback(i, done, {"train_loss": info["train_loss"],
                               "train_accuracy": info["train_accuracy"],
                               "test_accuracy": info["test_accuracy"], "lr": info["lr"],
                               "seconds": seconds[0], "path": str(path)})

    # No loop checkpoint, so the loop counts this session's epochs from 0; the epoch
    # trained at each step is the state's own count.
    return loop.run(state, timed_update, E - start,
                    batch_fn=lambda step, s: s.epochs_done, step_key="epoch",
                    what=f"expert {i}", nan_error=nan_error, callback=save_epoch,
                    progress_bar=False).state


def load_trajectories(out_dir, *, complete_only: bool = True,
                      max_epoch: int | None = None) -> Trajectories:
    """Read the experts that :func:`train_experts` wrote to ``out_dir``.

    ``complete_only=True``: the experts that finished all their epochs (unfinished ones
    are skipped). ``complete_only=False``: also unfinished experts with at least one
    epoch, every trajectory cut to the shortest one's length (e.g. to start matching on
    the early epochs while experts are still training). ``max_epoch``: keep only the
    snapshots of epochs ``0 .. max_epoch`` (trajectory matching rarely needs the late
    ones, and 100 CIFAR experts of width 128 hold 6.5 GB over 50 epochs).

    Raises FileNotFoundError when ``out_dir`` holds no expert files, CheckpointError for
    an unreadable file (named, and left in place) or experts of different configs or
    data in one directory.
    """
    if max_epoch is not None and not (_is_int(max_epoch) and max_epoch >= 1):
        raise ValueError(f"max_epoch must be a positive integer or None, got {max_epoch!r}.")
    return _load(Path(out_dir), experts=None, complete_only=complete_only, max_epoch=max_epoch)


def _load(out_dir: Path, *, experts: list[int] | None, complete_only: bool,
          max_epoch: int | None = None) -> Trajectories:
    out_dir = Path(out_dir)
    files = _expert_files(out_dir)
    if not files:
        where = "does not exist" if not out_dir.exists() else "holds no expert files"
        raise FileNotFoundError(
            f"{out_dir} {where} (expert_000.npz, ...): train the experts first with "
            f"kipnb.experts.train_experts(config, data, {str(out_dir)!r})."
        )
    if experts is not None:
        missing = [i for i in experts if i not in files]
        if missing:
            raise FileNotFoundError(f"{out_dir}: no file for expert(s) {missing}.")
        files = {i: files[i] for i in experts}
    metas = {i: _read_meta(p) for i, p in files.items()}
    first_i = next(iter(metas))
    first = metas[first_i]
    for i, meta in metas.items():
        diff = _config_diff(first["config"], meta["config"], f"in {files[first_i].name}",
                            f"in {files[i].name}")
        if diff or meta.get("fingerprint") != first.get("fingerprint"):
            why = "; ".join(diff) if diff else "trained on other data"
            raise CheckpointError(
                f"{out_dir} mixes experts of different runs: {files[i].name} differs from "
                f"{files[first_i].name} ({why}). Keep one run's experts per directory (no "
                f"file was changed)."
            )
    if complete_only:
        chosen = [i for i, m in metas.items() if m.get("complete")]
        if not chosen:
            status = ", ".join(f"{files[i].name}: {m['epochs_done']}/{m['config']['epochs']} epochs"
                               for i, m in metas.items())
            raise FileNotFoundError(
                f"None of the experts in {out_dir} is complete ({status}). Finish them with "
                f"train_experts (same config and data), or pass complete_only=False."
            )
    else:
        chosen = [i for i, m in metas.items() if int(m["epochs_done"]) >= 1]
        if not chosen:
            raise FileNotFoundError(f"No expert in {out_dir} has finished an epoch yet.")
    k = min(int(metas[i]["epochs_done"]) for i in chosen)
    if max_epoch is not None:
        k = min(k, int(max_epoch))
    params = np.empty((len(chosen), k + 1, int(first["num_params"])), np.float32)
    for j, i in enumerate(chosen):  # one expert's whole file in memory at a time
        params[j] = _load_state(files[i], metas[i])["snapshots"][:k + 1]
    test_acc = np.asarray([metas[i]["test_accuracy"][:k] for i in chosen], np.float32)
    config = _config_from(first["config"])
    image_shape = tuple(first["image_shape"])
    net, template = _template(config, image_shape, int(first["num_classes"]))
    if nets.count_params(template) != params.shape[-1]:
        raise CheckpointError(
            f"{files[chosen[0]]} holds {params.shape[-1]} parameters per snapshot but its "
            f"config's network has {nets.count_params(template)}: the file is not from this "
            f"kipnb version's ConvNet."
        )
    meta = {
        "fingerprint": first.get("fingerprint"), "dataset": first.get("dataset"),
        "image_shape": image_shape, "num_classes": int(first["num_classes"]),
        "num_params": int(params.shape[-1]), "experts": chosen,
        "train_loss": [metas[i]["train_loss"][:k] for i in chosen],
        "train_accuracy": [metas[i]["train_accuracy"][:k] for i in chosen],
        "seconds": [float(metas[i].get("seconds", 0.0)) for i in chosen],
        "out_dir": str(out_dir),
    }
    return Trajectories(params=params, config=config, net=net, template=template,
                        test_accuracy=test_acc, meta=meta)


# ----------------------------------------------------------------------- evaluation


def _check_eval_inputs(images, labels, d: TMData, net, lr):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != d.image_shape:
        raise ValueError(
            f"images must be (N, {', '.join(map(str, d.image_shape))}) model-space images like "
            f"the data's, got shape {images.shape}."
        )
    if len(images) == 0:
        raise ValueError("images is empty: pass at least one distilled image.")
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain NaN/Inf values.")
    labels = np.asarray(labels)
    C = d.num_classes
    if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        if labels.shape[0] != len(images) or labels.min() < 0 or labels.max() >= C:
            raise ValueError(
                f"labels must be ({len(images)},) classes in [0, {C}), got shape "
                f"{labels.shape} spanning [{labels.min()}, {labels.max()}]."
            )
        labels = labels.astype(np.int32)
    elif labels.ndim == 2 and np.issubdtype(labels.dtype, np.number):
        if labels.shape != (len(images), C):
            raise ValueError(
                f"soft labels (logits) must have shape ({len(images)}, {C}), got {labels.shape}."
            )
        if not np.all(np.isfinite(labels)):
            raise ValueError("soft labels contain NaN/Inf values.")
        labels = labels.astype(np.float32)
    else:
        raise ValueError(
            f"labels must be (N,) integer classes or (N, C) float label logits, got "
            f"{labels.dtype}{list(labels.shape)}."
        )
    if getattr(net, "num_classes", C) != C:
        raise ValueError(f"The network has {net.num_classes} outputs but the data {C} classes.")
    try:
        lr_value = float(lr)
    except (TypeError, ValueError):
        lr_value = float("nan")
    if isinstance(lr, bool) or not (math.isfinite(lr_value) and lr_value > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}.")
    return images, labels


def evaluate(
    images,
    labels,
    data: TMData,
    net,
    *,
    lr: float,
    config: EvalConfig = EvalConfig(),  # noqa: B008 (frozen)
    progress: bool = False,
) -> EvalResult:
    """Train ``config.num_seeds`` fresh ``net`` s on a distilled set; their test accuracy.

    Args:
      images: ``(N, H, W, C)`` distilled images in model space (as ``data.x_train``).
      labels: ``(N,)`` integer classes, or ``(N, num_classes)`` soft-label logits (DATM).
      data: supplies the test set (``x_test`` / ``y_test``, all of it).
      net: a :class:`kipnb.nets.ConvNet` or :class:`kipnb.nets.MLP` (e.g.
        ``trajectories.net``); seed ``i`` initializes it from
        ``fold_in(PRNGKey(config.seed), i)``.
      lr: the learning rate (the learned synthetic learning rate in MTT/DATM).
      config: an :class:`EvalConfig` (MTT's schedule: see the module docstring).
      progress: a tqdm bar over seeds x epochs.

    Raises TrainingDivergedError (naming the seed and epoch) if a loss becomes NaN/Inf.
    """
    if not isinstance(config, EvalConfig):
        raise TypeError(f"config must be an EvalConfig, got {type(config).__name__}.")
    if not isinstance(data, TMData):
        raise TypeError(f"data must be a kipnb.data.Data (data.prepare), got "
                        f"{type(data).__name__}.")
    images, labels = _check_eval_inputs(images, labels, data, net, lr)
    lr = float(lr)
    t0 = time.perf_counter()
    x, y = jnp.asarray(images), jnp.asarray(labels)
    n = len(images)
    base = jax.random.PRNGKey(config.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.num_seeds * config.epochs, desc="evaluate")
    test_accs, train_accs = [], []
    step = _step_for(net, config.augment, _loss_kind(labels))
    try:
        for s in range(config.num_seeds):
            key_s = jax.random.fold_in(base, s)
            params = _init(jax.random.fold_in(key_s, 0), net=net, shape=data.image_shape)
            state = _sgd_state(params, lr, config.momentum, config.weight_decay)
            pending = []  # (epoch, losses) not yet checked on the host
            last_correct = None
            for ep in range(config.epochs):
                perm = np.random.default_rng([config.seed, 1, s, ep]).permutation(n)
                if ep == config.epochs // 2 + 2:
                    # MTT: after epoch epochs // 2 + 1, a new optimizer (no momentum) with lr / 10
                    state = _sgd_state(state.params, config.lr_at(lr, ep), config.momentum,
                                       config.weight_decay)
                state, losses, correct, _ = train.epoch(
                    step, state, x, y, perm, jax.random.fold_in(key_s, 1 + ep),
                    batch_size=config.batch_size)
                pending.append((ep, jnp.stack(losses)))
                last_correct = correct
                if len(pending) >= _SYNC_EVERY or ep == config.epochs - 1:
                    for e_chk, l_chk in zip(
                        [p[0] for p in pending], jax.device_get([p[1] for p in pending]),
                        strict=True,
                    ):
                        if not np.all(np.isfinite(l_chk)):
                            raise TrainingDivergedError(
                                f"Evaluation network {s} (seed index), epoch {e_chk + 1}/"
                                f"{config.epochs}: the training loss became "
                                f"{l_chk[~np.isfinite(l_chk)][0]} (lr={config.lr_at(lr, e_chk):g})"
                                f": training diverged. Use a lower lr (e.g. {lr / 10:g}); a "
                                f"learned synthetic lr this large suggests the distillation "
                                f"itself diverged."
                            )
                    if bar is not None:
                        bar.update(len(pending))
                    pending = []
            params = state.params
            if not bool(jnp.all(jnp.isfinite(nets.flatten_params(params)))):
                raise TrainingDivergedError(
                    f"Evaluation network {s} (seed index): the parameters became NaN/Inf "
                    f"(lr={lr:g}): training diverged. Use a lower lr (e.g. {lr / 10:g})."
                )
            train_accs.append(float(np.sum(jax.device_get(last_correct))) / n)
            acc = float(_test_accuracy(net, params, data))
            test_accs.append(acc)
            if bar is not None:
                bar.set_postfix({"seed": s, "test_acc": f"{acc:.4f}"}, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return EvalResult(mean=float(np.mean(test_accs)), std=float(np.std(test_accs)),
                      accuracies=tuple(test_accs), train_accuracy=tuple(train_accs),
                      seconds=time.perf_counter() - t0)
