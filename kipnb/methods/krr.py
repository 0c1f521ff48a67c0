r"""Kernel ridge regression (KRR) and Label Solve.

KRR from a support set :math:`(X_s, Y_s)` (``n_s`` points) onto targets :math:`X_t`::

    K_ss = k(X_s, X_s)        (n_s, n_s)     K_ts = k(X_t, X_s)        (n_t, n_s)
    M    = K_ss + lam * I,    lam = reg * trace(K_ss) / n_s
    alpha = M^{-1} Y_s        (Cholesky: ``cho_factor`` / ``cho_solve``)
    pred  = K_ts alpha        (n_t, C)

The ridge ``lam`` is *relative*: ``reg`` is a fraction of the mean diagonal entry of
``K_ss`` (as in the KIP code of google-research and in neural-tangents), so one ``reg``
works for kernels of any scale. ``reg=1e-6`` is KIP's default.

Targets are one-hot vectors minus ``1/C`` (``one_hot_targets(..., centered=True)``), as
in KIP; the argmax, and so the accuracy, does not depend on the centering.

**Label Solve** (Nguyen, Chen, Lee 2021, "Dataset Meta-Learning from Kernel Ridge
Regression"; used at scale in Nguyen, Novak, Xiao, Lee 2021, "Dataset Distillation with
Infinitely Wide Convolutional Networks") keeps :math:`X_s` fixed and picks the labels
that minimise the KRR loss on the targets. The prediction is linear in the labels,
``pred = A Y_s`` with ``A = K_ts M^{-1}`` (n_t, n_s), so

    Y_s* = argmin_Y ||A Y - Y_t||_F^2 = A^+ Y_t        (minimum-norm least squares).

``label_solve`` accumulates the normal equations over blocks of targets (memory
``O(n_s^2 + block_size * n_s)`` however many targets there are)::

    G = sum_blocks A_b^T A_b  (n_s, n_s),      b = sum_blocks A_b^T Y_t,b  (n_s, C)

and solves the Tikhonov-regularised system with a Cholesky factorisation::

    Y_s = (G + mu * I)^{-1} b,      mu = solve_reg * trace(G) / n_s,

i.e. it minimises ``||A Y - Y_t||^2 + mu ||Y||^2``; as ``solve_reg -> 0`` this tends to
``A^+ Y_t``. ``G`` squares the condition number of ``A``, which is why ``mu`` is not
zero: by default ``solve_reg = 1e-6`` in float64 and ``1e-4`` in float32 (see
:data:`DEFAULT_SOLVE_REG`).

Conventions (also in the README, "Kernels, KRR and Label Solve" and "Development"):

* Pure functions of explicit arguments; every matmul uses
  ``precision=jax.lax.Precision.HIGHEST`` (TPUs otherwise multiply float32 in bfloat16).
* ``kernel_fn(x1, x2, get)`` has the neural-tangents API (``kipnb.stax`` or
  ``neural_tangents.stax``): it returns the ``(len(x1), len(x2))`` kernel, ``get`` is
  ``'nngp'`` or ``'ntk'``.
* Computations run in the kernel's dtype: float32 works; float64 (enable it with
  ``jax.config.update('jax_enable_x64', True)``) is better for tiny ``reg`` and for
  Label Solve.
* ``krr_fit``/``krr_predict``/``krr`` work under ``jax.jit`` and ``jax.grad`` (KIP
  differentiates through them). Outside a trace they check their inputs: a non-finite
  kernel or a failed Cholesky raises :class:`NumericalError` (a ``FloatingPointError``
  and a ``ValueError``) that names the fix; inside a trace such failures show up as NaN.
* Shape mismatches raise ``ValueError`` naming the shapes.
* Devices: ``krr_evaluate`` and ``label_solve`` split each block of targets over all
  devices (:mod:`kipnb.shard`, mesh axis ``'data'``) and replicate the support side;
  ``block_size`` is rounded up to a multiple of the device count. On one device this
  is the plain computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_factor, cho_solve

from kipnb import loop, shard

__all__ = [
    "DEFAULT_REG",
    "DEFAULT_SOLVE_REG",
    "NumericalError",
    "accuracy",
    "block_slices",
    "default_solve_reg",
    "evaluate_block",
    "krr",
    "krr_evaluate",
    "krr_fit",
    "krr_predict",
    "label_solve",
    "label_solve_kernels",
    "one_hot",
    "one_hot_targets",
    "regularized",
]

KernelFn = Callable[..., jax.Array]

HIGHEST = jax.lax.Precision.HIGHEST

#: Default relative ridge of KRR: ``lam = reg * trace(K_ss) / n_s`` (KIP's default).
DEFAULT_REG = 1e-6

#: Default relative Tikhonov term of Label Solve's final solve, by dtype of the kernel:
#: ``mu = solve_reg * trace(A^T A) / n_s``. float32 needs the larger value because
#: ``A^T A`` is formed explicitly (its rounding errors are ~1e-7 of its largest
#: eigenvalue, and trace / n_s is down to 1/n_s of that).
DEFAULT_SOLVE_REG = {"float64": 1e-6, "float32": 1e-4}

_FIX = (
    "Fixes: raise `reg` (e.g. 1e-4), compute in float64 "
    "(jax.config.update('jax_enable_x64', True) and float64 inputs), and check the "
    "inputs for NaN/Inf or duplicate points."
)


class NumericalError(FloatingPointError, ValueError):
    """A kernel with NaN/Inf entries, or a Cholesky factorisation that failed."""


# --------------------------------------------------------------------------- helpers


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=HIGHEST)


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _nonfinite_counts(x) -> tuple[int, int] | None:
    """``(n_nan, n_inf)`` of a concrete array with non-finite entries, else None.

    Checked on the host with NumPy (no per-shape XLA compilation); None under a trace.
    """
    if _is_traced(x):
        return None
    xn = np.asarray(x)
    if np.isfinite(xn).all():
        return None
    return int(np.isnan(xn).sum()), int(np.isinf(xn).sum())


def _check_finite(x, name: str, fix: str = _FIX) -> None:
    """Raise NumericalError if concrete ``x`` has NaN/Inf (no-op under a trace)."""
    counts = _nonfinite_counts(x)
    if counts is not None:
        raise NumericalError(
            f"{name} (shape {tuple(np.shape(x))}, {x.dtype}) has {counts[0]} NaN and "
            f"{counts[1]} Inf entries. {fix}"
        )


def _check_reg(reg, name: str = "reg") -> None:
    if not _is_traced(reg) and np.ndim(reg) == 0 and float(reg) < 0:
        raise ValueError(f"{name} must be >= 0, got {reg}")


def _check_get(get) -> None:
    if get not in ("nngp", "ntk"):
        raise ValueError(f"get must be 'nngp' or 'ntk' (one kernel), got {get!r}")


def _as_2d_targets(y, name: str):
    if y.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (n, num_classes) array of targets, got shape {y.shape}; "
            "make targets from integer labels with one_hot_targets(labels, num_classes)"
        )
    return y


def _check_square(k: jax.Array, name: str = "k_ss") -> None:
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) kernel matrix, got shape {k.shape}")


def _check_factor(lower: jax.Array, k_ss: jax.Array, reg) -> None:
    """Raise NumericalError if a concrete Cholesky factor has NaN (no-op under a trace)."""
    if _nonfinite_counts(lower) is not None:
        raise NumericalError(
            f"Cholesky factorisation of k_ss + reg * trace(k_ss)/n * I failed (NaN in the "
            f"factor): the matrix (shape {k_ss.shape}, {k_ss.dtype}, reg={reg}, "
            f"trace={float(np.trace(np.asarray(k_ss))):.6g}) is not numerically positive "
            "definite. " + _FIX
        )


def _check_labels(labels, num_classes: int):
    """Validate 1-D integer labels in [0, num_classes); the range only when concrete."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D integer class indices, got shape {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not _is_traced(labels) and labels.shape[0]:
        ln = np.asarray(labels)
        lo, hi = int(ln.min()), int(ln.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]"
            )


def one_hot(labels, num_classes: int, centered: bool = True, dtype=np.float32) -> np.ndarray:
    """Host (NumPy) :func:`one_hot_targets`, without its label checks (fast, for blocks).

    Args:
      labels: ``(n,)`` integers in ``[0, num_classes)`` (not checked).
      num_classes: the number of classes ``C``.
      centered: subtract ``1/C`` (KIP's targets).
      dtype: the NumPy dtype of the result.

    Returns:
      ``(n, C)`` NumPy array.

    Example:
      >>> one_hot(np.array([0, 1]), 2)
      array([[ 0.5, -0.5],
             [-0.5,  0.5]], dtype=float32)
    """
    labels = np.asarray(labels)
    y = (labels[:, None] == np.arange(num_classes)).astype(dtype)
    if centered:
        y -= np.asarray(1.0 / num_classes, dtype)
    return y



@jax.jit
def _cho_solve_lower(lower: jax.Array, b: jax.Array) -> jax.Array:
    return cho_solve((lower, True), b)


@jax.jit
def _fit_core(k_ss: jax.Array, y_s: jax.Array, reg):
    lower, _ = cho_factor(regularized(k_ss, reg), lower=True)
    return lower, cho_solve((lower, True), y_s)


# ---------------------------------------------------------------------- public API


def one_hot_targets(
    labels, num_classes: int, centered: bool = True, dtype=None
) -> jax.Array:
    """Regression targets from integer labels: one-hot, minus ``1/num_classes`` if centered.

    ``labels``: ``(n,)`` integers in ``[0, num_classes)``. Returns ``(n, num_classes)`` of
    ``dtype`` (default: JAX's default float, float32 unless x64 is enabled). Centering
    (KIP's convention) makes each target row sum to zero; it does not change argmax.
    """
    if not isinstance(labels, jax.Array):
        labels = np.asarray(labels)
    _check_labels(labels, num_classes)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype
    y = (jnp.asarray(labels)[:, None] == jnp.arange(num_classes)).astype(dtype)
    if centered:
        y = y - jnp.asarray(1.0 / num_classes, dtype)
    return y


def regularized(k_ss: jax.Array, reg=DEFAULT_REG) -> jax.Array:
    """``k_ss + reg * trace(k_ss) / n * I``: the ridge relative to the mean diagonal."""
    k_ss = jnp.asarray(k_ss)
    _check_square(k_ss)
    _check_reg(reg)
    n = k_ss.shape[0]
    lam = reg * jnp.trace(k_ss) / n
    return k_ss + lam * jnp.eye(n, dtype=k_ss.dtype)


def krr_fit(k_ss: jax.Array, y_s: jax.Array, reg=DEFAULT_REG) -> jax.Array:
    """Dual coefficients ``alpha = (k_ss + reg * trace(k_ss)/n * I)^{-1} y_s``.

    ``k_ss``: ``(n_s, n_s)``; ``y_s``: ``(n_s, C)`` (or ``(n_s,)``). Returns ``alpha`` of
    ``y_s``'s shape in ``k_ss``'s dtype. Uses a Cholesky factorisation.
    """
    k_ss, y_s = jnp.asarray(k_ss), jnp.asarray(y_s)
    _check_square(k_ss)
    if y_s.ndim not in (1, 2) or y_s.shape[0] != k_ss.shape[0]:
        raise ValueError(
            f"y_s must have shape (n_s, C) or (n_s,) with n_s = {k_ss.shape[0]} rows of "
            f"k_ss {k_ss.shape}, got y_s {y_s.shape}"
        )
    _check_reg(reg)
    _check_finite(k_ss, "k_ss")
    _check_finite(y_s, "y_s", "Check the support labels.")
    lower, alpha = _fit_core(k_ss, y_s.astype(k_ss.dtype), reg)
    _check_factor(lower, k_ss, reg)
    return alpha


def krr_predict(k_ts: jax.Array, alpha: jax.Array) -> jax.Array:
    """Predictions ``k_ts @ alpha``; ``k_ts``: ``(n_t, n_s)``, ``alpha``: ``(n_s, C)``."""
    k_ts, alpha = jnp.asarray(k_ts), jnp.asarray(alpha)
    if k_ts.ndim != 2 or alpha.ndim not in (1, 2) or k_ts.shape[1] != alpha.shape[0]:
        raise ValueError(
            f"k_ts must be (n_t, n_s) and alpha (n_s, C) with the same n_s, got k_ts "
            f"{k_ts.shape} and alpha {alpha.shape}"
        )
    _check_finite(k_ts, "k_ts")
    return _matmul(k_ts, alpha)


def krr(k_ss: jax.Array, k_ts: jax.Array, y_s: jax.Array, reg=DEFAULT_REG) -> jax.Array:
    """KRR predictions on the targets: ``k_ts (k_ss + reg * trace(k_ss)/n * I)^{-1} y_s``."""
    k_ss, k_ts = jnp.asarray(k_ss), jnp.asarray(k_ts)
    _check_square(k_ss)
    if k_ts.ndim != 2 or k_ts.shape[1] != k_ss.shape[0]:
        raise ValueError(
            f"k_ts must be (n_t, n_s) with n_s = {k_ss.shape[0]} (from k_ss {k_ss.shape}), "
            f"got k_ts {k_ts.shape}"
        )
    return krr_predict(k_ts, krr_fit(k_ss, y_s, reg))


def accuracy(pred: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose argmax equals the label.

    ``pred``: ``(n, C)``; ``labels``: ``(n,)`` integers or ``(n, C)`` targets (argmax).
    """
    pred, labels = jnp.asarray(pred), jnp.asarray(labels)
    if pred.ndim != 2:
        raise ValueError(f"pred must be (n, num_classes), got shape {pred.shape}")
    if labels.ndim == 2:
        if labels.shape != pred.shape:
            raise ValueError(f"target shape {labels.shape} != pred shape {pred.shape}")
        labels = jnp.argmax(labels, axis=1)
    elif labels.ndim != 1 or labels.shape[0] != pred.shape[0]:
        raise ValueError(
            f"labels must be (n,) or (n, C) with n = {pred.shape[0]} rows of pred "
            f"{pred.shape}, got {labels.shape}"
        )
    return jnp.mean(jnp.argmax(pred, axis=1) == labels)


def label_solve_kernels(k_ss, k_ts, y_t, reg=DEFAULT_REG, solve_reg: float | None = None):
    """Label Solve from precomputed kernels: the normal equations of :func:`label_solve`.

    With ``A = k_ts (k_ss + reg * trace(k_ss)/n_s * I)^{-1}`` and ``G = A^T A``, returns
    ``(G + mu I)^{-1} A^T y_t`` with ``mu = solve_reg * trace(G) / n_s``: what
    :func:`label_solve` computes blockwise from a kernel function, here in one piece (for
    small problems, tests and the exercise of notebook 02).

    Args:
      k_ss: ``(n_s, n_s)`` support kernel.
      k_ts: ``(n_t, n_s)`` kernel between targets and support.
      y_t: ``(n_t, C)`` targets, e.g. ``one_hot_targets(labels_t, C)`` (centred).
      reg: KRR's relative ridge.
      solve_reg: relative Tikhonov term; ``None``: :func:`default_solve_reg` of the dtype.

    Returns:
      ``(n_s, C)`` labels in ``k_ss``'s dtype.

    Example:
      >>> k = jnp.eye(3) * 2.0
      >>> y = one_hot_targets(jnp.array([0, 1, 2]), 3)
      >>> label_solve_kernels(k, k, y, reg=0.0, solve_reg=0.0).shape
      (3, 3)
    """
    k_ss, k_ts = jnp.asarray(k_ss), jnp.asarray(k_ts)
    _check_square(k_ss)
    y_t = _as_2d_targets(jnp.asarray(y_t, k_ss.dtype), "y_t")
    if k_ts.ndim != 2 or k_ts.shape != (y_t.shape[0], k_ss.shape[0]):
        raise ValueError(
            f"k_ts must be (n_t, n_s) = ({y_t.shape[0]}, {k_ss.shape[0]}) (rows of y_t, "
            f"size of k_ss), got {k_ts.shape}"
        )
    _check_reg(reg)
    if solve_reg is None:
        solve_reg = default_solve_reg(k_ss.dtype)
    _check_reg(solve_reg, "solve_reg")
    return _label_solve_kernels_core(k_ss, k_ts.astype(k_ss.dtype), y_t, reg, solve_reg)


@jax.jit
def _label_solve_kernels_core(k_ss, k_ts, y_t, reg, solve_reg):
    lower, _ = cho_factor(regularized(k_ss, reg), lower=True)
    a = cho_solve((lower, True), k_ts.T).T
    _, y_s = _tikhonov_solve(_matmul(a.T, a), _matmul(a.T, y_t), solve_reg)
    return y_s


def default_solve_reg(dtype) -> float:
    """Label Solve's default ``solve_reg`` for a kernel ``dtype`` (1e-6 f64, 1e-4 else)."""
    return DEFAULT_SOLVE_REG["float64" if jnp.dtype(dtype) == jnp.float64 else "float32"]


# ------------------------------------------------------------ blockwise evaluation


def _raise_on_bad_block(flags, blocks) -> None:
    """Raise for the first block whose kernel had NaN/Inf entries (``flags``: one device
    bool per block, read in one transfer)."""
    if not flags:
        return
    ok = np.asarray(jnp.stack(flags))
    if not ok.all():
        start, stop = blocks[int(np.flatnonzero(~ok)[0])]
        raise NumericalError(
            f"k(x_t, x_s) has NaN/Inf entries in target rows {start}:{stop}. {_FIX}"
        )


def block_slices(n: int, block_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``block_size`` rows covering ``range(n)``.

    Args:
      n: the number of rows.
      block_size: rows per block (the last block may be shorter).

    Returns:
      An iterator of ``(start, stop)`` pairs.

    Example:
      >>> list(block_slices(5, 2))
      [(0, 2), (2, 4), (4, 5)]
    """
    for start in range(0, n, block_size):
        yield start, min(start + block_size, n)



def _take_block(x, start: int, stop: int, block_size: int):
    """Rows ``start:stop`` of ``x`` padded to ``block_size`` rows by repeating the last.

    Every block then has the same shape, so the jitted block function compiles once.
    Padding repeats a real row (not zeros: some kernels divide by the input norm).
    """
    if stop - start == block_size:
        return x[start:stop]
    idx = np.minimum(np.arange(start, start + block_size), stop - 1)
    return x[idx]


def _check_kernel_block(k: jax.Array, shape: tuple[int, int], what: str) -> None:
    if k.shape != shape:
        raise ValueError(
            f"kernel_fn returned shape {k.shape} for {what}, expected {shape}; kernel_fn(x1, "
            "x2, get) must return the (len(x1), len(x2)) kernel matrix"
        )


def _validate_block_inputs(x_s, x_t, block_size: int, get) -> None:
    _check_get(get)
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if np.shape(x_s)[1:] != np.shape(x_t)[1:]:
        raise ValueError(
            f"x_s {np.shape(x_s)} and x_t {np.shape(x_t)} must have the same per-example "
            "shape"
        )
    if np.shape(x_s)[0] < 1:
        raise ValueError(f"x_s is empty (shape {np.shape(x_s)})")


def _progress(iterable, total: int, enabled: bool, desc: str):
    return loop.progress(iterable, total=total, desc=desc, enabled=enabled)


# The jitted pieces take kernel_fn as a static argument, so repeated calls with the same
# kernel_fn (e.g. evaluating every few KIP steps) reuse the compiled code.


@functools.partial(jax.jit, static_argnames=("kernel_fn", "get"))
def _support_system(kernel_fn: KernelFn, get: str, x_s: jax.Array, reg):
    """``K_ss`` and the lower Cholesky factor of ``K_ss + reg * trace(K_ss)/n_s * I``."""
    k_ss = kernel_fn(x_s, x_s, get)
    n_s = x_s.shape[0]
    _check_kernel_block(k_ss, (n_s, n_s), f"k(x_s, x_s) with x_s {x_s.shape}")
    lower, _ = cho_factor(regularized(k_ss, reg), lower=True)
    return k_ss, lower


def _support_factor(kernel_fn: KernelFn, x_s: jax.Array, reg, get: str):
    _check_reg(reg)
    k_ss, lower = _support_system(kernel_fn, get, x_s, reg)
    _check_finite(k_ss, "k_ss = kernel_fn(x_s, x_s)")
    _check_factor(lower, k_ss, reg)
    return k_ss, lower


@functools.partial(jax.jit, static_argnames=("kernel_fn", "get"))
def evaluate_block(kernel_fn: KernelFn, get: str, x_s, alpha, xb, yb, mask):
    """KRR's sum of squared errors and number correct on one (padded) block of targets.

    The jitted kernel of :func:`krr_evaluate` (one block of ``K(x_b, x_s) @ alpha``);
    public so that benchmarks can time or compile it (``evaluate_block.lower(...)``).

    Args:
      kernel_fn: the kernel (static: hashable, reused objects reuse the compilation).
      get: ``'ntk'`` or ``'nngp'`` (static).
      x_s: ``(n_s, ...)`` support inputs.
      alpha: ``(n_s, C)`` KRR weights, ``(K_ss + lam I)^{-1} y_s`` (:func:`krr_fit`).
      xb: ``(b, ...)`` a block of targets.
      yb: ``(b, C)`` their label vectors.
      mask: ``(b,)`` 1 for real rows, 0 for padding.

    Returns:
      ``(sum of squared errors, number correct, kernel block finite)`` as 0-d arrays.

    Example:
      >>> import kipnb.archs
      >>> k = kipnb.archs.kernel("fc", depth=1)
      >>> x = jnp.ones((2, 2, 2, 1)); y = jnp.eye(2)
      >>> sq, n_ok, ok = evaluate_block(k, "ntk", x, y, x, y, jnp.ones(2))
      >>> bool(ok)
      True
    """
    k_tb = kernel_fn(xb, x_s, get)
    _check_kernel_block(k_tb, (xb.shape[0], x_s.shape[0]), f"a block of {xb.shape[0]} targets")
    pred = _matmul(k_tb, alpha)
    sq = jnp.sum(((pred - yb) ** 2) * mask[:, None])
    correct = jnp.sum((jnp.argmax(pred, 1) == jnp.argmax(yb, 1)) * mask)
    return sq, correct, jnp.all(jnp.isfinite(k_tb))


_evaluate_block = evaluate_block  # the old private name (tests)


@functools.partial(jax.jit, static_argnames=("kernel_fn", "get"))
def _accumulate_normal_equations(kernel_fn: KernelFn, get: str, x_s, lower, gram, rhs, xb, yb,
                                 mask):
    """Add ``A_b^T A_b`` and ``A_b^T y_b`` of one (padded) block, ``A_b = K_tb M^{-1}``."""
    k_tb = kernel_fn(xb, x_s, get)
    _check_kernel_block(k_tb, (xb.shape[0], x_s.shape[0]), f"a block of {xb.shape[0]} targets")
    # A_b = K_tb M^{-1} = (M^{-1} K_tb^T)^T since M is symmetric; padded rows zeroed.
    a = cho_solve((lower, True), k_tb.T).T * mask[:, None]
    return gram + _matmul(a.T, a), rhs + _matmul(a.T, yb), jnp.all(jnp.isfinite(k_tb))


@jax.jit
def _tikhonov_solve(gram, rhs, solve_reg):
    """``(G + solve_reg * trace(G)/n * I)^{-1} rhs`` by Cholesky; returns (factor, solution)."""
    n = gram.shape[0]
    mu = solve_reg * jnp.trace(gram) / n
    lower, _ = cho_factor(gram + mu * jnp.eye(n, dtype=gram.dtype), lower=True)
    return lower, cho_solve((lower, True), rhs)


def _device_block(x, start: int, stop: int, block_size: int, dtype) -> jax.Array:
    """A padded block of rows of ``dtype``, split over the devices' ``'data'`` axis.

    NumPy inputs are cast on the host. ``block_size`` must be a multiple of the device
    count (see :func:`_block_size`).
    """
    block = _take_block(x, start, stop, block_size)
    if isinstance(block, jax.Array):
        block = block if block.dtype == dtype else block.astype(dtype)
    else:
        block = np.asarray(block, dtype=dtype)
    return shard.shard_batch(block)


def _mask(n_valid: int, block_size: int, dtype) -> jax.Array:
    return shard.shard_batch((np.arange(block_size) < n_valid).astype(dtype))


def _block_size(block_size: int, n_t: int) -> int:
    """``min(block_size, n_t)`` rounded up to a multiple of the device count."""
    return shard.pad_to_multiple(min(int(block_size), int(n_t)))


def krr_evaluate(
    kernel_fn: KernelFn,
    x_s,
    y_s,
    x_t,
    labels_t,
    *,
    reg=DEFAULT_REG,
    get: str = "ntk",
    block_size: int = 1000,
    centered: bool = True,
    progress: bool = False,
) -> dict:
    """Evaluate KRR from the support set ``(x_s, y_s)`` on many targets, block by block.

    Args:
      kernel_fn: ``kernel_fn(x1, x2, get) -> (len(x1), len(x2))`` (neural-tangents API);
        it is called inside ``jax.jit`` on blocks of ``block_size`` targets, as a static
        argument: it must be hashable (functions are), and reusing the same object
        reuses the compiled code.
      x_s, y_s: support inputs ``(n_s, ...)`` and labels ``(n_s, C)`` (any real labels:
        centered one-hot, or learned / label-solved ones).
      x_t: target inputs ``(n_t, ...)``; a NumPy array stays on the host and only one
        block at a time is moved to the device.
      labels_t: ``(n_t,)`` integer labels, or ``(n_t, C)`` regression targets.
      reg: relative ridge, ``lam = reg * trace(K_ss) / n_s``.
      get: ``'ntk'`` or ``'nngp'``.
      block_size: targets per kernel block; memory is ``O(block_size * n_s)``. Rounded
        up to a multiple of the device count; each block is split over the devices.
      centered: whether targets made from integer ``labels_t`` are centered one-hot.
      progress: show a tqdm progress bar over the blocks.

    Returns:
      ``dict(accuracy=..., mse=..., num_targets=n_t)`` as Python numbers; ``mse`` is the
      mean over all ``n_t * C`` entries of ``(pred - y_t)**2`` (KIP's loss is
      ``0.5 * mse``).
    """
    x_s = jnp.asarray(x_s)
    y_s = _as_2d_targets(jnp.asarray(y_s), "y_s")
    if y_s.shape[0] != x_s.shape[0]:
        raise ValueError(f"y_s has {y_s.shape[0]} rows but x_s {x_s.shape} has {x_s.shape[0]}")
    _validate_block_inputs(x_s, x_t, block_size, get)
    n_t, num_classes = np.shape(x_t)[0], y_s.shape[1]
    labels_t = np.asarray(labels_t) if not isinstance(labels_t, jax.Array) else labels_t
    if labels_t.ndim == 1:
        if labels_t.shape[0] != n_t:
            raise ValueError(f"labels_t {labels_t.shape} does not match x_t {np.shape(x_t)}")
        _check_labels(labels_t, num_classes)
        y_t = None
    elif labels_t.ndim == 2:
        if labels_t.shape != (n_t, num_classes):
            raise ValueError(
                f"targets labels_t {labels_t.shape} must be (n_t, C) = {(n_t, num_classes)} "
                f"(x_t {np.shape(x_t)}, y_s {y_s.shape})"
            )
        y_t = labels_t
    else:
        raise ValueError(f"labels_t must be (n_t,) or (n_t, C), got shape {labels_t.shape}")
    if n_t == 0:
        raise ValueError("x_t is empty")

    _check_finite(y_s, "y_s", "Check the support labels.")
    x_s = shard.replicate(x_s)
    k_ss, lower = _support_factor(kernel_fn, x_s, reg, get)
    alpha = _cho_solve_lower(lower, shard.replicate(y_s.astype(k_ss.dtype)))
    bs = _block_size(block_size, n_t)

    sq_total, correct_total, sqs, corrects, flags = 0.0, 0, [], [], []
    blocks = list(block_slices(n_t, bs))
    for start, stop in _progress(blocks, len(blocks), progress, "KRR eval"):
        xb = _device_block(x_t, start, stop, bs, x_s.dtype)
        if y_t is None:
            lb = np.asarray(_take_block(labels_t, start, stop, bs))
            yb = shard.shard_batch(one_hot(lb, num_classes, centered, k_ss.dtype))
        else:
            yb = _device_block(y_t, start, stop, bs, k_ss.dtype)
        mask = _mask(stop - start, bs, k_ss.dtype)
        sq, correct, finite = evaluate_block(kernel_fn, get, x_s, alpha, xb, yb, mask)
        sqs.append(sq)
        corrects.append(correct)
        flags.append(finite)
    # One host sync after the loop, not one per block: the host queues block k+1 while
    # the device computes block k (JAX's asynchronous dispatch).
    _raise_on_bad_block(flags, blocks)
    for sq, correct in zip(np.asarray(jnp.stack(sqs)), np.asarray(jnp.stack(corrects)),
                           strict=True):
        sq_total += float(sq)
        correct_total += int(correct)
    return {
        "accuracy": correct_total / n_t,
        "mse": sq_total / (n_t * num_classes),
        "num_targets": int(n_t),
    }


# --------------------------------------------------------------------- Label Solve


def label_solve(
    kernel_fn: KernelFn,
    x_s,
    x_t,
    y_t,
    *,
    reg=DEFAULT_REG,
    solve_reg: float | None = None,
    get: str = "ntk",
    block_size: int = 1000,
    progress: bool = False,
) -> jax.Array:
    """Support labels minimising the KRR loss on the targets (Label Solve).

    With ``A = k(x_t, x_s) (K_ss + reg * trace(K_ss)/n_s * I)^{-1}`` (n_t, n_s), returns

        y_s = (A^T A + mu I)^{-1} A^T y_t,     mu = solve_reg * trace(A^T A) / n_s,

    the minimiser of ``||A y_s - y_t||^2 + mu ||y_s||^2`` (-> ``A^+ y_t``, the
    minimum-norm least-squares labels, as ``solve_reg -> 0``). ``A^T A`` and ``A^T y_t``
    are accumulated over blocks of ``block_size`` targets, so all of a training set can
    be used with memory ``O(n_s^2 + block_size * n_s)``.

    Args:
      kernel_fn: ``kernel_fn(x1, x2, get)`` (neural-tangents API), jitted per block as a
        static (hashable) argument, as in :func:`krr_evaluate`.
      x_s: support inputs ``(n_s, ...)``.
      x_t: target inputs ``(n_t, ...)`` (NumPy arrays stay on the host).
      y_t: ``(n_t, C)`` targets, e.g. ``one_hot_targets(labels_t, C)``.
      reg: KRR's relative ridge (the same value must be used when evaluating).
      solve_reg: relative Tikhonov term of the final ``n_s x n_s`` solve; ``None`` means
        :func:`default_solve_reg` of the kernel's dtype (1e-6 float64, 1e-4 float32).
        Raise it if the solve fails or the labels come out huge.
      get: ``'ntk'`` or ``'nngp'``.
      block_size: targets per block (rounded up to a multiple of the device count;
        each block is split over the devices, the support side is replicated).
      progress: show a tqdm progress bar over the blocks.

    Returns:
      ``(n_s, C)`` labels in the kernel's dtype.
    """
    x_s = jnp.asarray(x_s)
    _validate_block_inputs(x_s, x_t, block_size, get)
    y_t = np.asarray(y_t) if not isinstance(y_t, jax.Array) else y_t
    _as_2d_targets(y_t, "y_t")
    n_t, n_s, num_classes = np.shape(x_t)[0], x_s.shape[0], y_t.shape[1]
    if y_t.shape[0] != n_t:
        raise ValueError(f"y_t {y_t.shape} must have one row per target of x_t {np.shape(x_t)}")
    if n_t == 0:
        raise ValueError("x_t is empty")

    x_s = shard.replicate(x_s)
    k_ss, lower = _support_factor(kernel_fn, x_s, reg, get)
    dtype = k_ss.dtype
    if solve_reg is None:
        solve_reg = default_solve_reg(dtype)
    _check_reg(solve_reg, "solve_reg")
    bs = _block_size(block_size, n_t)

    _check_finite(y_t, "y_t", "Check the targets.")
    gram = shard.replicate(np.zeros((n_s, n_s), dtype))
    rhs = shard.replicate(np.zeros((n_s, num_classes), dtype))
    blocks, flags = list(block_slices(n_t, bs)), []
    for start, stop in _progress(blocks, len(blocks), progress, "Label Solve"):
        xb = _device_block(x_t, start, stop, bs, x_s.dtype)
        yb = _device_block(y_t, start, stop, bs, dtype)
        gram, rhs, finite = _accumulate_normal_equations(
            kernel_fn, get, x_s, lower, gram, rhs, xb, yb, _mask(stop - start, bs, dtype)
        )
        flags.append(finite)
    _raise_on_bad_block(flags, blocks)  # one host sync, after the loop

    chol, y_s = _tikhonov_solve(gram, rhs, solve_reg)
    if _nonfinite_counts(chol) is not None:
        raise NumericalError(
            f"Label Solve's Cholesky factorisation of A^T A + solve_reg * trace/n_s * I "
            f"failed (n_s={n_s}, {dtype}, solve_reg={solve_reg}, "
            f"trace(A^T A)={float(np.trace(np.asarray(gram))):.3g}): the system is not "
            "numerically positive definite. Fixes: raise `solve_reg` (e.g. 1e-3), compute "
            "in float64 (jax.config.update('jax_enable_x64', True)), raise `reg`, or check "
            "the inputs (are the targets far from every support point?)."
        )
    return y_s
