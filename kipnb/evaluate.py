"""Judge any distilled set with any evaluator: ``krr(ds, data, ...)``, ``network(ds, data, ...)``.

Both take a :class:`kipnb.DistilledSet` and prepared data (a :class:`kipnb.data.Data`
from :func:`kipnb.data.prepare`, ``kip.prepare`` or ``experts.prepare``) and return one
:class:`EvalResult` (``mean``, ``std``, ``accs``, ``protocol``, ``seconds``; accuracies
are fractions of the test set).

**Spaces.** A set's images are in the space its learner consumed, with the fitted
transform that took pixels there (``ds.transform``). When that transform is not the
data's (another preprocessing, or the same one fitted on other data), the images are
brought into the data's space, ``data.transform.apply(ds.to_pixels())``
(``on_mismatch='convert'``, the default), or refused with an error naming both
preprocessings by their :func:`kipnb.preprocess.method_name` (e.g. ``'zca'``, KIP's
relative ZCA, vs ``'zca_kornia'``, MTT's) and recipes (``on_mismatch='error'``). A set in
pixel space (``transform=None``,
e.g. a format-1 file) gets the data's transform applied.

**Labels.** Each label kind is converted explicitly, by the papers' conventions:

================  ==========================  ===========================================
label_kind        KRR and KIP's transfer      MTT/DATM's evaluation
                  (MSE / regression targets)  (cross-entropy)
================  ==========================  ===========================================
``class``         one-hot minus 1/C           the classes (hard labels)
``regression``    the labels as given         argmax of the labels (hard labels)
                  (learned by KIP, solved
                  by Label Solve)
``logits``        softmax(logits) minus 1/C   softmax(logits) as the target distribution
================  ==========================  ===========================================

and the networks of MTT's evaluation train with the set's learned ``lr`` when it has one
(MTT, DATM), else the protocol's default (MTT's ``lr_teacher``, 0.01).

**Protocols of** :func:`network` (named presets, :data:`PROTOCOLS`):

* ``'kip_transfer'``: KIP's transfer (Nguyen et al. 2021): finite networks built from the
  same :mod:`kipnb.stax` layers (NTK parameterization), trained with MSE on the labels
  above, centered, Adam (:class:`kipnb.train.TrainConfig`, :func:`kipnb.train.transfer`);
  ``net`` is a ``TrainConfig`` or an arch name (``'fc'``, ``'conv'``).
* ``'mtt'``: MTT's ``evaluate_synset`` (Cazenavette et al. 2022; DATM the same with soft
  labels): fresh :class:`kipnb.nets.ConvNet` s trained by SGD (momentum 0.9, weight decay
  5e-4, lr / 10 halfway), DSA on every batch (:class:`kipnb.experts.EvalConfig`);
  ``net`` is a ``ConvNet``/``MLP`` (default: the experts' width-32 ConvNet-3).

Example:
    >>> import numpy as np
    >>> from kipnb import DistilledSet, data, evaluate
    >>> d = data.prepare("digits")
    >>> idx = np.array([np.flatnonzero(d.labels_train == c)[0] for c in range(10)])
    >>> ds = DistilledSet(d.x_train[idx], d.labels_train[idx], label_kind="class",
    ...                   num_classes=10, transform=d.transform)
    >>> res = evaluate.krr(ds, d, kernel="fc")
    >>> 0.5 < res.mean <= 1.0, res.protocol["evaluator"]
    (True, 'krr')
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kipnb import archs, experts, nets, preprocess, train
from kipnb import data as data_lib
from kipnb import krr as krr_lib
from kipnb.distilled import DistilledSet, jsonable

__all__ = ["PROTOCOLS", "EvalResult", "inputs", "krr", "labels_for", "network"]

#: The named presets of :func:`network`: the loss they train with and their defaults.
PROTOCOLS = {
    "kip_transfer": {"loss": "mse", "config": train.TrainConfig},
    "mtt": {"loss": "xent", "config": experts.EvalConfig},
}

#: MTT's starting student learning rate (``lr_teacher``): used when a set has no ``lr``.
DEFAULT_MTT_LR = 0.01


@dataclass(frozen=True)
class EvalResult:
    """The test accuracies of one evaluation.

    Attributes:
        mean: the mean test accuracy (a fraction in [0, 1]).
        std: the population standard deviation (``np.std``) over ``accs``; 0 for KRR.
        accs: one accuracy per trained network (one for KRR).
        protocol: what was done (evaluator, kernel or network, label conversion,
            the space conversion, the settings), JSON-able.
        seconds: wall time.

    Example:
        >>> str(EvalResult(0.731, 0.008, (0.72, 0.74), {"evaluator": "mtt"}, 1.0))
        '73.1 ± 0.8 % (2 runs, mtt)'
    """

    mean: float
    std: float
    accs: tuple[float, ...]
    protocol: dict
    seconds: float

    def __str__(self) -> str:
        n = len(self.accs)
        return (f"{100 * self.mean:.1f} ± {100 * self.std:.1f} % ({n} run{'s' * (n != 1)}, "
                f"{self.protocol.get('evaluator')})")


# ----------------------------------------------------------------------------- data


def _test_split(data, n_test: int | None):
    if not isinstance(data, data_lib.Data):
        raise TypeError(
            f"data must be a kipnb.data.Data (kipnb.data.prepare, kip.prepare or "
            f"experts.prepare), got {type(data).__name__}."
        )
    x, y = data.x_test, data.y_test
    n = len(x) if n_test is None else min(int(n_test), len(x))
    return np.asarray(x[:n], np.float32), np.asarray(y[:n])


def _describe(t) -> str:
    if t is None:
        return "pixels (no preprocessing)"
    return f"{preprocess.method_name(t)!r} {t.recipe()!r}"


def inputs(ds: DistilledSet, data, *, on_mismatch: str = "convert") -> tuple[np.ndarray, str]:
    """The set's images in the data's space, and how they got there.

    Args:
        ds: a :class:`~kipnb.DistilledSet`.
        data: prepared data with ``transform`` and ``x_test``.
        on_mismatch: ``'convert'`` (``data.transform.apply(ds.to_pixels())``) or
            ``'error'`` when the set's transform is not the data's.

    Returns:
        ``(images, how)``, ``how`` one of ``'as stored'``, ``'converted'``.

    Raises:
        ValueError: image shapes differ, or ``on_mismatch='error'`` and the
            preprocessings differ (the message names both).
    """
    if not isinstance(ds, DistilledSet):
        raise TypeError(f"Expected a DistilledSet, got {type(ds).__name__}.")
    if on_mismatch not in ("convert", "error"):
        raise ValueError(f"on_mismatch={on_mismatch!r}: use 'convert' or 'error'.")
    shape = tuple(np.asarray(data.x_test).shape[1:])
    if tuple(ds.images.shape[1:]) != shape:
        raise ValueError(
            f"The set's images are {tuple(ds.images.shape[1:])} but the data's are {shape} "
            f"(set from {ds.dataset!r}, data {getattr(data, 'dataset', '?')!r})."
        )
    d_t = getattr(data, "transform", None)
    if ds.transform is not None and preprocess.equal(ds.transform, d_t):
        return np.asarray(ds.images, np.float32), "as stored"
    if on_mismatch == "error":
        raise ValueError(
            f"The set's images are in the space of {_describe(ds.transform)} but the data's "
            f"preprocessing is {_describe(d_t)} (or the same one fitted on other data). "
            "Use on_mismatch='convert' to map the set through its pixels into the data's "
            "space, or prepare the data with the set's preprocessing."
        )
    pixels = ds.to_pixels()
    if d_t is None:
        return pixels, "converted"
    return np.asarray(d_t.apply(pixels), np.float32), "converted"


def labels_for(ds: DistilledSet, loss: str) -> tuple[np.ndarray, str]:
    """The set's labels for a learner trained with ``loss`` (the table above).

    Args:
        ds: a :class:`~kipnb.DistilledSet`.
        loss: ``'mse'`` (KRR, KIP's transfer) or ``'xent'`` (MTT's evaluation).

    Returns:
        ``(labels, rule)``: (N, C) float targets for ``'mse'``; (N,) int classes, or
        (N, C) logits whose softmax is the target, for ``'xent'``; ``rule`` names the
        conversion.

    Example:
        >>> ds = DistilledSet(np.zeros((2, 1, 1, 1)), np.array([0, 1]), "class", 2)
        >>> labels_for(ds, "mse")[0].tolist(), labels_for(ds, "xent")[1]
        ([[0.5, -0.5], [-0.5, 0.5]], 'classes')
    """
    c, kind = ds.num_classes, ds.label_kind
    if loss == "mse":
        if kind == "class":
            return np.eye(c, dtype=np.float32)[ds.labels] - 1.0 / c, "one-hot - 1/C"
        if kind == "regression":
            return np.asarray(ds.labels, np.float32), "as given"
        p = np.asarray(jax.nn.softmax(jnp.asarray(ds.labels, jnp.float32), axis=1))
        return p - 1.0 / c, "softmax(logits) - 1/C"
    if loss == "xent":
        if kind == "class":
            return ds.labels.astype(np.int32), "classes"
        if kind == "regression":
            return ds.labels.argmax(axis=1).astype(np.int32), "argmax(labels)"
        return np.asarray(ds.labels, np.float32), "softmax(logits)"
    raise ValueError(f"loss={loss!r}: use 'mse' or 'xent'.")


# ------------------------------------------------------------------------- evaluators


def _kernel_fn(kernel, depth, num_classes) -> tuple[Callable, str]:
    if callable(kernel):
        return kernel, getattr(kernel, "__name__", "kernel_fn")
    if kernel not in archs.ARCHS:
        raise ValueError(f"kernel={kernel!r}: use one of {sorted(archs.ARCHS)} or a kernel_fn.")
    kw = {} if depth is None else {"depth": depth}
    return archs.kernel(kernel, num_classes=num_classes, **kw), f"{kernel}{depth or ''}"


def krr(
    ds: DistilledSet,
    data,
    *,
    kernel: str | Callable = "fc",
    depth: int | None = None,
    get: str = "ntk",
    reg: float = krr_lib.DEFAULT_REG,
    n_test: int | None = None,
    block_size: int = 1000,
    on_mismatch: str = "convert",
) -> EvalResult:
    """KRR from the set onto the test set with an infinite-width kernel.

    Args:
        ds: the distilled set.
        data: prepared data (its test split is used).
        kernel: an architecture of :mod:`kipnb.archs` (``'fc'``, ``'conv'``) or a
            ``kernel_fn``.
        depth: the architecture's depth (None: its default).
        get: ``'ntk'`` or ``'nngp'``.
        reg: the relative ridge.
        n_test: the first ``n_test`` test images (None: all).
        block_size: test images per kernel block.
        on_mismatch: see :func:`inputs`.

    Returns:
        An :class:`EvalResult` with one accuracy.

    Example:
        See the module docstring.
    """
    t0 = time.perf_counter()
    x_s, how = inputs(ds, data, on_mismatch=on_mismatch)
    y_s, rule = labels_for(ds, "mse")
    x_t, y_t = _test_split(data, n_test)
    kernel_fn, name = _kernel_fn(kernel, depth, ds.num_classes)
    out = krr_lib.krr_evaluate(kernel_fn, jnp.asarray(x_s), jnp.asarray(y_s), x_t, y_t, reg=reg,
                               get=get, block_size=min(block_size, len(x_t)))
    acc = float(out["accuracy"])
    protocol = {"evaluator": "krr", "kernel": f"{name}-{get}", "reg": reg, "labels": rule,
                "images": how, "n_test": len(x_t)}
    return EvalResult(acc, 0.0, (acc,), protocol, time.perf_counter() - t0)


def network(
    ds: DistilledSet,
    data,
    *,
    protocol: str = "kip_transfer",
    net: Any = None,
    lr: float | None = None,
    n_test: int | None = None,
    on_mismatch: str = "convert",
    progress: bool = False,
    **settings,
) -> EvalResult:
    """Train finite networks on the set by a named protocol; their test accuracy.

    Args:
        ds: the distilled set.
        data: prepared data (its test split is used).
        protocol: ``'kip_transfer'`` or ``'mtt'`` (module docstring).
        net: ``'kip_transfer'``: a :class:`kipnb.train.TrainConfig` or an arch name
            (``'fc'``/``'conv'``); ``'mtt'``: a :class:`kipnb.nets.ConvNet` or ``MLP``
            (default: width-32 ConvNet-3 with instance norm, as the experts).
        lr: ``'mtt'``: the learning rate (default: the set's ``lr``, else 0.01);
            ``'kip_transfer'``: overrides the TrainConfig's ``learning_rate``.
        n_test: the first ``n_test`` test images (None: all).
        on_mismatch: see :func:`inputs`.
        progress: tqdm bars.
        **settings: fields of the protocol's config (``TrainConfig`` or
            ``experts.EvalConfig``), e.g. ``steps=300``, ``epochs=300``, ``seeds=(0, 1)``,
            ``num_seeds=3``.

    Returns:
        An :class:`EvalResult` with one accuracy per network.

    Example:
        >>> from kipnb import data
        >>> d = data.prepare("digits")
        >>> idx = np.array([np.flatnonzero(d.labels_train == c)[0] for c in range(10)])
        >>> ds = DistilledSet(d.x_train[idx], d.labels_train[idx], "class", 10,
        ...                   transform=d.transform)
        >>> r = network(ds, d, net="fc", width=64, steps=20, seeds=(0,))
        >>> r.protocol["evaluator"], len(r.accs)
        ('kip_transfer', 1)
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {sorted(PROTOCOLS)}.")
    t0 = time.perf_counter()
    x_s, how = inputs(ds, data, on_mismatch=on_mismatch)
    y_s, rule = labels_for(ds, PROTOCOLS[protocol]["loss"])
    x_t, y_t = _test_split(data, n_test)
    if protocol == "kip_transfer":
        if net is None or isinstance(net, str):
            cfg = train.TrainConfig(**({} if net is None else {"arch": net}), **settings)
        elif isinstance(net, train.TrainConfig):
            cfg = dataclasses.replace(net, **settings)
        else:
            raise TypeError(f"protocol='kip_transfer' needs net= a TrainConfig or an arch name, "
                            f"got {type(net).__name__}.")
        if lr is not None:
            cfg = dataclasses.replace(cfg, learning_rate=float(lr))
        out = train.transfer((x_s, y_s), x_t, y_t, cfg, progress=progress)
        accs = tuple(float(a) for a in out["accs"])
        details = {"network": jsonable(cfg)}
    else:
        cfg = experts.EvalConfig(**settings)
        if net is None:
            net = experts.ExpertConfig().net(x_s.shape[1:], ds.num_classes)
        if not isinstance(net, nets.ConvNet | nets.MLP):
            raise TypeError(f"protocol='mtt' needs net= a nets.ConvNet or nets.MLP, got "
                            f"{type(net).__name__}.")
        lr_used = lr if lr is not None else (ds.lr if ds.lr is not None else DEFAULT_MTT_LR)
        test = data_lib.Data(x_train=x_s, y_train=ds.classes, x_test=x_t, y_test=y_t,
                             class_names=tuple(str(c) for c in range(ds.num_classes)),
                             dataset=str(getattr(data, "dataset", "custom")))
        res = experts.evaluate(x_s, y_s, test, net, lr=lr_used, config=cfg, progress=progress)
        accs = tuple(res.accuracies)
        details = {"network": jsonable(net), "lr": float(lr_used),
                   "lr_from": "given" if lr is not None else
                   ("the set" if ds.lr is not None else "default"),
                   "settings": jsonable(cfg)}
    protocol_info = {"evaluator": protocol, "labels": rule, "images": how, "n_test": len(x_t),
                     **details}
    return EvalResult(float(np.mean(accs)), float(np.std(accs)), accs, protocol_info,
                      time.perf_counter() - t0)
