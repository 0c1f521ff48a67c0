"""Infinite-width (NNGP / NTK) kernels with the API of ``neural_tangents.stax``.

What it is
----------
``neural-tangents`` 0.6.5, its newest release, no longer imports on current JAX, so
kipnb carries the layers the dataset-distillation papers use. Every layer constructor
returns ``(init_fn, apply_fn, kernel_fn)`` like ``neural_tangents.stax``:

* ``init_fn(key, input_shape) -> (output_shape, params)`` and ``apply_fn(params, x)``
  build and run the finite network (NTK or standard parameterization; ``serial``'s
  params are a list with one entry per layer, weights are standard normal in the NTK
  parameterization, HWIO for convolutions);
* ``kernel_fn(x1, x2=None, get=None)`` returns the infinite-width kernels between the
  rows of ``x1`` and ``x2`` (``x2=None`` means ``x2 = x1``). ``get`` is ``'nngp'``,
  ``'ntk'`` (an array), a tuple of them (a namedtuple ``Kernel`` with those fields in
  that order) or ``None`` (a namedtuple with ``nngp`` and ``ntk``).

Code written for neural-tangents runs on kipnb by changing one import::

    from neural_tangents import stax   ->   from kipnb import stax

and ``nt.batch(kernel_fn, batch_size)`` becomes ``stax.batch(kernel_fn, batch_size)``.

Supported
---------
``serial``, ``Dense``, ``Conv`` (``'SAME'``/``'VALID'`` padding, strides, 1-3 spatial
dimensions), ``Relu`` (and ``ABRelu``, ``LeakyRelu``, ``Abs``), ``Erf``, ``AvgPool``
(``'SAME'``/``'VALID'``, strides, ``normalize_edges``), ``GlobalAvgPool``, ``Flatten``,
``Identity``, ``Gelu``, ``LayerNorm`` (``axis`` containing the channel axis: per pixel
or over the image, as neural-tangents) and ``batch``; finite-network kernels
``empirical_nngp_fn``, ``empirical_ntk_fn``, ``empirical_kernel_fn`` and
``monte_carlo_kernel_fn`` (in neural-tangents at the package's top level,
``nt.monte_carlo_kernel_fn``), and ``predict.max_learning_rate``
(``nt.predict.max_learning_rate``). Argument names and defaults are those of neural-tangents
0.6.5; ``W_std``, ``b_std``, ``parameterization='ntk' | 'standard'`` and ``s`` enter the
kernels by neural-tangents' formulas (its values are the test fixtures, see
``scripts/make_nt_fixtures.py``). Inputs are ``(N, D)`` for dense networks and
channels-last ``(N, H, W, C)`` (NHWC; or ``(N, W, C)``, ``(N, D, H, W, C)``) for conv
nets. Kernels are computed in the inputs' float dtype (float32, or float64 when
``jax_enable_x64`` is on).

Not supported (a clear error, never a silent wrong answer): ``parallel``/``FanOut``,
``CIRCULAR`` padding, non-default ``batch_axis``/``channel_axis``/``dimension_numbers``,
masking, dropout, ``LayerNorm`` over the batch axis or without the channel axis (instance
norm: the finite layer runs, its kernel is an error, as in neural-tangents), attention,
``diagonal_batch``/``diagonal_spatial`` keyword arguments, and kernel outputs other than
``nngp`` and ``ntk``. ``do_stabilize`` is accepted and has no effect (ReLU kernels are
positively homogeneous).

How the spatial covariance is represented
-----------------------------------------
A conv net's kernel between two images is a covariance between all pixel pairs,
``K[n1, n2, h1, h2, w1, w2]``; neural-tangents keeps it whole (``(H*W)**2`` entries per
image pair) whenever any pooling layer follows. kipnb only keeps the entries that the
*output* depends on. Before evaluating, ``kernel_fn`` walks the network backwards and
computes, per spatial dimension, the largest pixel offset ``|p - q|`` any later layer
reads:

* ``Flatten`` reads only ``p == q`` (radius 0); ``GlobalAvgPool`` reads all pairs;
* ``Conv`` with stride ``s`` maps output offset ``d`` to input offset ``s * d`` (the
  filter shifts both pixels alike), so radius ``r`` needs ``s * r``;
* ``AvgPool(w, s)`` needs ``s * r + w - 1``; nonlinearities keep the radius.

Each spatial dimension is then stored as a *band* ``K[..., p, d]`` with
``d = q - p`` in ``[-r, r]`` (2r + 1 entries) or, when that is not smaller, as the
full ``K[..., p, q]`` (the neural-tangents layout). Band entries whose partner pixel
``q`` lies outside the image are kept at exactly zero. A convolution is then one
``lax.reduce_window`` sum along the ``p`` axes (the filter shifts ``p`` and ``q``
together, so ``d`` only gets subsampled by the stride), pooling a sum of ``w`` shifted
slices along ``d`` and ``w`` along ``p``, and a nonlinearity reads the variance at
``p`` and, through a static gather, at ``p + d``. For ConvNet-3 on 28x28 images the
first block stores 784 x 15 x 15 entries per image pair instead of 784 x 784, and no
convolution goes through XLA's (on CPU slow) single-channel ``conv`` op. A network
ending in ``Flatten`` after unpooled convolutions only ever stores the diagonal
(neural-tangents' ``diagonal_spatial``); a network ending in ``GlobalAvgPool`` stores
the full covariance, as neural-tangents does. A network whose output is still spatial
returns the full ``(N1, N2, H, H, W, W)`` kernel in neural-tangents' layout.

Evaluation runs in two passes: a *self* pass per image (its own covariance, which the
nonlinearities need as variances ``k11``/``k22``) over ``x1`` and ``x2`` together, then a
*cross* pass per image pair for ``nngp`` and ``ntk``. Both are split with
``jax.lax.map`` into chunks whose covariance arrays stay near 2 MiB on CPU, which keeps
them in the caches (up to 2x faster than whole-batch arrays on the 2-core test machine),
and near 256 MiB on GPU/TPU (untested here), which bounds memory; under ``jax.grad``
each chunk is rematerialised. Dense networks (one entry per pair, the cost is one
matmul) are chunked only beyond 256 MiB: there the loop and the remat only cost time
and compilation (the FC-1 KIP step ran ~1.3x slower and compiled ~1.8x longer chunked),
and their self pass runs on ``x1`` and ``x2`` separately instead of on a copy of both.
``kernel_fn`` checks shapes eagerly (clear errors), then
calls one ``jax.jit``-compiled function, cached per network and input shapes, so
repeated eager calls do not retrace. On the 2-core CPU this was developed on, the
ConvNet-3 NTK (with pooling) ran 13-36x faster than neural-tangents 0.6.5 (forward, and
forward + gradient); dense kernels 1.3-6x (the float64 FC-1 KIP step 1.4-1.8x), the
colab's Conv and Myrtle-5 steps 1.1-1.9x (two runs of 2026-12-06; runs move by up to
2x), but first calls (compilation; JAX 0.10 compiles the same program ~1.9x slower than
the JAX 0.4.30 neural-tangents pins) 0.4-1.7x; see ``benchmarks/kernel_speed.py``, its
saved results and the README.

Numerics
--------
All contractions use ``precision=jax.lax.Precision.HIGHEST``. The arc-cosine kernels
(``Relu``, ``ABRelu``) evaluate ``root = sqrt(k11 * k22 - k12**2)`` and the angle
``arctan2(root, k12)``. At ``x1 == x2`` (every image with itself, and duplicated
images) the root sits at zero, where its derivative is infinite; the NNGP's derivative
is finite there (the singular terms cancel) and the NTK has a cusp. So that ``jax.grad``
w.r.t. ``x1`` and ``x2`` stays finite:

* ``k11 * k22 - k12**2`` below ``8 * sqrt(F) * eps * k11 * k22`` (``F`` the input's
  features or channels; the rounding level of a pair of identical images, whose self
  and cross inner products are summed in different orders, see ``boundary_ulps``) is
  set to exactly 0: the angle is then exactly 0 instead of ``sqrt(eps)``-noisy (float64
  NTK diagonals of ``kernel_fn(x, x)`` equal the exact angle-0 value to ~1e-15, not
  ~1e-8; tested);
* the square root gets derivative 0 at 0, and ``arctan2`` a derivative with a floored
  denominator, the choices neural-tangents' ``_sqrt``/``_arctan2`` make (the subgradient
  0 at the NTK's cusp, the exact derivative of the NNGP). For the ReLU family these
  derivatives are written out as one VJP of the whole kernel (``custom_vjp``; it
  recomputes the angle from ``k12, k11, k22`` instead of storing a chain of ``where``
  residuals), which made the backward pass ~10-25% cheaper in CPU time; ``Erf`` uses
  custom JVPs. (Forward-mode ``jax.jvp`` through ReLU kernels is therefore not
  available; ``jax.grad``/``vjp`` are.)

``precision=HIGHEST`` costs nothing on CPU (float32 and float64 matmuls gave identical
values and times with and without it on JAX 0.10.2) and keeps accelerators from rounding
the inputs to bfloat16/TF32.

``arctan2`` itself is evaluated with the Cephes polynomial (float32) / rational
(float64) approximations to full precision (tested against ``numpy.arctan2``), because
XLA's CPU ``atan2`` took ~5x longer per element here.

Block-wise evaluation
---------------------
``batch(kernel_fn, batch_size)`` computes ``(N1, N2)`` kernels in blocks of at most
``batch_size`` rows and columns with ``jax.lax.map`` (each block rematerialised under
``jax.grad``), so memory is bounded by one block; e.g. 60000 training images against a
100-image support set.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "ABRelu",
    "Abs",
    "AvgPool",
    "Conv",
    "Dense",
    "Erf",
    "Flatten",
    "Gelu",
    "GlobalAvgPool",
    "Identity",
    "LayerNorm",
    "LeakyRelu",
    "Relu",
    "batch",
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "max_learning_rate",
    "monte_carlo_kernel_fn",
    "predict",
    "serial",
]

HIGHEST = lax.Precision.HIGHEST
_VALID_GETS = ("nngp", "ntk")
_TINY = 1e-30  # below this a squared sine counts as zero for derivatives (as in NT)
_BOUNDARY_ULPS = 8  # 1 - correlation**2 below this many eps * sqrt(fan-in) counts as 0


def boundary_ulps(n_features: int) -> float:
    """Threshold, in units of eps, below which ``1 - correlation**2`` counts as exactly 0.

    A pair's self inner products (``sum(x * x)``) and its cross product (a matmul entry)
    are summed in different orders, so for identical inputs ``k11 * k22 - k12**2`` is
    not 0 but rounding noise that grows like ``sqrt(n_features) * eps * k11 * k22``
    (random-walk accumulation: measured up to 76 eps in float64 and 32 eps in float32 on
    784-pixel Fashion-MNIST images). The threshold is ``8 * sqrt(n_features)`` eps
    (at least 8 eps): about 3x the largest value measured, and in float32 still below the
    angle noise (``~sqrt(noise)``) the unsnapped formula would have anyway.

    Args:
      n_features: the contraction length of the input covariance (features of a dense
        input, channels of a convolutional one).

    Returns:
      The threshold in eps units.

    Example:
      >>> round(boundary_ulps(784))
      224
    """
    return _BOUNDARY_ULPS * max(1.0, math.sqrt(n_features))


# --------------------------------------------------------------------------- numerics


@jax.custom_jvp
def _safe_sqrt(x):
    """``sqrt(max(x, 0))`` whose derivative is 0 (not inf/NaN) where ``x <= 1e-30``."""
    return jnp.sqrt(jnp.maximum(x, 0.0))


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = _safe_sqrt(x)
    positive = x > _TINY
    dy = jnp.where(positive, t / (2.0 * jnp.where(positive, y, 1.0)), 0.0)
    return y, dy


# Minimax coefficients of arctan on the reduced range (Cephes atanf / atan).
_ATAN_F32 = (8.05374449538e-2, -1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1)
_ATAN_F64_P = (-8.750608600031904122785e-1, -1.615753718733365076637e1,
               -7.500855792314704667340e1, -1.228866684490136173410e2,
               -6.485021904942025371773e1)
_ATAN_F64_Q = (1.0, 2.485846490142306297962e1, 1.650270098316988542046e2,
               4.328810604912902668951e2, 4.853903996359136964868e2,
               1.945506571482613964425e2)


def _horner(coeffs, x):
    out = jnp.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        out = out * x + c
    return out


def _atan_unit(z):
    """``arctan(z)`` for ``z`` in ``[0, 1]`` by polynomial/rational evaluation.

    XLA lowers ``atan2`` on CPU to a slow scalar loop; this vectorises and keeps full
    float32/float64 accuracy (tested against ``jnp.arctan2``).
    """
    if z.dtype == jnp.float64:
        big = z > 0.66
        zr = jnp.where(big, (z - 1.0) / (z + 1.0), z)
        s = zr * zr
        a = zr + zr * s * _horner(_ATAN_F64_P, s) / _horner(_ATAN_F64_Q, s)
        return jnp.where(big, a + (math.pi / 4 + 3.061616997868382943065e-17), a)
    big = z > 0.4142135623730950
    zr = jnp.where(big, (z - 1.0) / (z + 1.0), z)
    s = zr * zr
    a = _horner(_ATAN_F32, s) * s * zr + zr
    return jnp.where(big, a + math.pi / 4, a)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _safe_arctan2(y, x, fill):
    """``arctan2(y, x)`` with value ``fill`` at ``(0, 0)`` and a floored-denominator JVP."""
    ay, ax = jnp.abs(y), jnp.abs(x)
    swap = ay > ax
    num, den = jnp.where(swap, ax, ay), jnp.where(swap, ay, ax)
    a = _atan_unit(num / jnp.where(den == 0, 1.0, den))
    a = jnp.where(swap, math.pi / 2 - a, a)
    a = jnp.where(x < 0, math.pi - a, a)
    a = jnp.where(y < 0, -a, a)
    return jnp.where((y == 0) & (x == 0), fill, a)


@_safe_arctan2.defjvp
def _safe_arctan2_jvp(fill, primals, tangents):
    (y, x), (ty, tx) = primals, tangents
    denom = jnp.maximum(x * x + y * y, _TINY)
    return _safe_arctan2(y, x, fill), (ty * x - tx * y) / denom


# --------------------------------------------------------------------------- get


@functools.cache
def _kernel_type(fields: tuple[str, ...]):
    return collections.namedtuple("Kernel", fields)


def _canonical_get(get) -> tuple[tuple[str, ...], bool]:
    """Returns (fields, single): the requested kernels and whether to return a bare array."""
    if get is None:
        return _VALID_GETS, False
    if isinstance(get, str):
        fields, single = (get,), True
    elif isinstance(get, (tuple, list)) and get and all(isinstance(g, str) for g in get):
        fields, single = tuple(get), False
    else:
        raise ValueError(
            f"get={get!r} is not understood: pass 'nngp', 'ntk', a tuple of them such as "
            f"('nngp', 'ntk'), or None for both."
        )
    for g in fields:
        if g not in _VALID_GETS:
            raise ValueError(
                f"Unknown kernel get={g!r}: kipnb.stax computes only 'nngp' and 'ntk'; "
                f"use get='nngp', get='ntk' or get=('nngp', 'ntk')."
            )
    if len(set(fields)) != len(fields):
        raise ValueError(f"get={get!r} names a kernel twice; list each of 'nngp', 'ntk' once.")
    return fields, single


# --------------------------------------------------------------------------- representation


@dataclasses.dataclass(frozen=True)
class _Dim:
    """How one spatial dimension of a covariance is stored.

    ``full``: axes ``(p, q)`` of length ``size`` each. Band: axes ``(p, j)`` with
    ``q = p + j - r``, ``j`` in ``[0, 2r]``; entries with ``q`` outside the image are 0.
    """

    size: int
    full: bool
    r: int

    @property
    def m(self) -> int:
        return self.size if self.full else 2 * self.r + 1


def _make_dim(size: int, r: int) -> _Dim:
    r = max(0, min(int(r), size - 1))
    if 2 * r + 1 >= size:
        return _Dim(size, True, size - 1)
    return _Dim(size, False, r)


def _band_mask(dims: Sequence[_Dim]) -> np.ndarray | None:
    """The 0/1 mask over ``(P0, M0, P1, M1, ...)`` of in-image entries; None if all are."""
    if all(d.full for d in dims):
        return None
    mask = np.ones(())
    for d in dims:
        if d.full:
            m = np.ones((d.size, d.m))
        else:
            q = np.arange(d.size)[:, None] + np.arange(d.m)[None, :] - d.r
            m = ((q >= 0) & (q < d.size)).astype(np.float64)
        mask = np.multiply.outer(mask, m)
    return mask


def _apply_mask(x, mask: np.ndarray | None):
    return x if mask is None else x * jnp.asarray(mask, x.dtype)


@dataclasses.dataclass
class _K:
    """Covariances flowing through the layers (never leaves this module).

    Self pass (``nb == 1``): ``arrays == {'cov': (N, P0, M0, P1, M1, ...)}``, the covariance
    of each image with itself; ``variances`` collects, per nonlinearity (layer index), the
    per-pixel variances ``(N, P0, P1, ...)`` it saw. Cross pass (``nb == 2``):
    ``arrays == {'nngp': (N1, N2, P0, M0, ...), 'ntk': ...}`` (no ``'ntk'`` means zero, the
    inputs' NTK); ``variances`` maps each nonlinearity to ``(v1 at p, v2 at q)`` from the
    self passes.
    """

    arrays: dict
    nb: int
    dims: tuple[_Dim, ...]
    compute_ntk: bool
    variances: dict
    index: int = -1
    ulps: float = _BOUNDARY_ULPS  # see boundary_ulps

    def map(self, fn: Callable[[jax.Array, int, str], jax.Array], **changes) -> _K:
        new = {name: fn(a, self.nb, name) for name, a in self.arrays.items()}
        return dataclasses.replace(self, arrays=new, **changes)


def _strided(x, axis: int, start: int, count: int, stride: int):
    return lax.slice_in_dim(x, start, start + stride * (count - 1) + 1, stride, axis)


def _window_sum(x, axes: dict[int, tuple[int, int, int, int]]):
    """Sums over windows: ``axes`` maps axis -> (window, stride, pad low, pad high).

    One ``reduce_window`` for all axes (used for convolutions): on CPU about as fast as
    summing shifted slices, and its gradient (pad + reduce_window) compiles ~2x faster.
    """
    window, strides, pads = [1] * x.ndim, [1] * x.ndim, [(0, 0)] * x.ndim
    for a, (w, s, lo, hi) in axes.items():
        window[a], strides[a], pads[a] = w, s, (lo, hi)
    return lax.reduce_window(x, np.zeros((), x.dtype), lax.add, window, strides, pads)


def _slice_sum(x, axes: dict[int, tuple[int, int, int, int]]):
    """Like ``_window_sum`` but as a sum of shifted slices, which XLA fuses with the
    neighbouring elementwise work (used for pooling, measured faster there)."""
    for a, (w, s, lo, hi) in axes.items():
        x = _pad_axes(x, [a], lo, hi)
        n_out = (x.shape[a] - w) // s + 1
        x = sum(_strided(x, a, t, n_out, s) for t in range(w))
    return x


def _pad_axes(x, axes: Sequence[int], lo: int, hi: int):
    if lo == 0 and hi == 0:
        return x
    widths = [(0, 0)] * x.ndim
    for a in axes:
        widths[a] = (lo, hi)
    return jnp.pad(x, widths)


def _to_band(x, ap: int, dim: _Dim, r: int):
    """Full ``(p, q)`` axes at ``ap, ap+1`` -> band of radius ``r``."""
    n = dim.size
    xp = _pad_axes(x, [ap + 1], r, r)
    xp = jnp.moveaxis(xp, (ap, ap + 1), (-2, -1))
    p = np.arange(n)[:, None]
    q = p + np.arange(2 * r + 1)[None, :]  # padded coordinates
    return jnp.moveaxis(xp[..., p, q], (-2, -1), (ap, ap + 1))


def _to_full(x, ap: int, dim: _Dim):
    """Band axes at ``ap, ap+1`` -> full ``(p, q)``; offsets beyond the band become 0."""
    n, r = dim.size, dim.r
    xp = _pad_axes(x, [ap + 1], n - 1 - r, n - 1 - r)  # radius n - 1
    xp = jnp.moveaxis(xp, (ap, ap + 1), (-2, -1))
    p = np.arange(n)[:, None]
    j = np.arange(n)[None, :] - p + n - 1
    return jnp.moveaxis(xp[..., p, j], (-2, -1), (ap, ap + 1))


def _retarget(k: _K, targets: Sequence[_Dim]) -> _K:
    """Converts dimensions whose storage mode differs from ``targets``."""
    dims = list(k.dims)
    ops = []
    for i, (d, t) in enumerate(zip(k.dims, targets, strict=True)):
        if d.full and not t.full:
            ops.append((i, "band", d, t.r))
            dims[i] = _Dim(d.size, False, t.r)
        elif not d.full and t.full:
            ops.append((i, "full", d, None))
            dims[i] = _Dim(d.size, True, d.size - 1)
    if not ops:
        return k

    def convert(x, nb, name):
        for i, kind, d, r in ops:
            ap = nb + 2 * i
            x = _to_band(x, ap, d, r) if kind == "band" else _to_full(x, ap, d)
        return x

    return k.map(convert, dims=tuple(dims))


def _diag(cov, dims: Sequence[_Dim]):
    """Per-pixel variances ``(N, P0, P1, ...)`` of a self-covariance ``(N, P0, M0, ...)``."""
    for i in reversed(range(len(dims))):
        ap, d = 1 + 2 * i, dims[i]
        if d.full:
            cov = jnp.moveaxis(jnp.diagonal(cov, axis1=ap, axis2=ap + 1), -1, ap)
        else:
            cov = lax.index_in_dim(cov, d.r, axis=ap + 1, keepdims=False)
    return cov


def _at_p(v, dims: Sequence[_Dim]):
    """``(N, P0, P1, ..., *rest)`` -> ``(N, P0, 1, P1, 1, ..., *rest)``."""
    for i in reversed(range(len(dims))):
        v = jnp.expand_dims(v, 2 + i)
    return v


def _at_q(v, dims: Sequence[_Dim]):
    """Values at the partner pixel: ``(N, P0, P1, ..., *rest)`` -> ``(N, X0, M0, ..., *rest)``.

    ``X = P`` for a band dimension (the partner of ``(p, j)`` is ``p + j - r``; outside the
    image the value is 0) and ``X = 1`` for a full one (the partner is ``q``).
    """
    for i in reversed(range(len(dims))):
        ax, d = 1 + i, dims[i]
        if d.full:
            v = jnp.expand_dims(v, ax)
        elif d.r == 0:  # the partner is the pixel itself (Flatten readouts): no gather
            v = jnp.expand_dims(v, ax + 1)
        else:
            # A gather (its gradient a scatter-add). Stacked shifted slices avoid the
            # scatter but made the Myrtle-5 float32 gradient ~30 % slower (2026-12-06).
            vp = _pad_axes(v, [ax], d.r, d.r)
            idx = np.arange(d.size)[:, None] + np.arange(d.m)[None, :]
            v = jnp.take(vp, idx, axis=ax)
    return v


def _input_covariance(xa, xbq, dims: Sequence[_Dim], nb: int):
    """``sum_c xa[a, p, c] xb[b, q, c] / C`` in the storage given by ``dims``.

    ``xbq`` is ``_at_q(xb, dims)``. ``nb == 2``: all pairs ``(N1, N2, ...)``; ``nb == 1``:
    ``xa`` and ``xb`` are the same images, paired one to one (``(N, ...)``).
    """
    n_ch = xa.shape[-1]
    if not dims:
        if nb == 1:
            return jnp.sum(xa * xa, axis=-1) / n_ch
        return jnp.matmul(xa, xbq.T, precision=HIGHEST) / n_ch
    xa = _at_p(xa, dims)
    if nb == 2:
        xa, xbq = xa[:, None], xbq[None]
    if n_ch <= 16:  # one fused multiply-add pass; a dot would be tiny and batched per pixel
        mul = _bmul if nb == 2 else jnp.multiply  # nb == 2 broadcasts: see _mul_sum_to
        out = mul(xa[..., 0], xbq[..., 0])
        for c in range(1, n_ch):
            out = out + mul(xa[..., c], xbq[..., c])
    else:
        out = jnp.einsum("...c,...c->...", xa, xbq, precision=HIGHEST)
    return out / n_ch


# --------------------------------------------------------------------------- chunking

# Chunks are sized so one covariance array of a chunk stays near this many bytes. On CPU,
# 2 MiB keeps the working set in cache: up to ~2x faster than 8-16 MiB or whole-batch
# arrays, and fewer loop steps than 1 MiB (measured on a 2-core EPYC, 2 MiB L2 per core).
# Accelerators want large parallel blocks instead, so there the chunks only bound memory
# (not measured: no GPU/TPU here).
_BLOCK_BYTES = {"cpu": 2 * 2**20}
_BLOCK_BYTES_ACCELERATOR = 2**28
# Dense networks (no spatial dimensions) have one covariance entry per pair: chunking
# their elementwise work only adds loop, remat and compile overhead (measured: the FC-1
# KIP step ran ~1.5x slower chunked), so they are chunked only beyond this many bytes.
_DENSE_BLOCK_BYTES = 2**28


def _block_bytes(dense: bool = False) -> int:
    if dense:
        return _DENSE_BLOCK_BYTES
    return _BLOCK_BYTES.get(jax.default_backend(), _BLOCK_BYTES_ACCELERATOR)


def _num_chunks(n: int, c: int) -> tuple[int, int]:
    """(number of chunks, chunk size) covering ``n`` rows in chunks of at most ``c``."""
    nc = -(-n // max(1, c))
    return nc, -(-n // nc)


def _split_rows(tree, nc: int, c: int):
    def split(x):
        pad = nc * c - x.shape[0]
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
        return x.reshape(nc, c, *x.shape[1:])

    return jax.tree_util.tree_map(split, tree)


def _chunked(fn: Callable, args, n: int, c: int, out_axis: int = 0):
    """``fn(*args)`` evaluated on row chunks of ``args`` (leading axis ``n``) by lax.map.

    ``fn``'s outputs carry the chunk's rows on axis ``out_axis``; the result is the
    outputs of all chunks joined along that axis (padding rows dropped).
    """
    if n <= c:
        return fn(*args)
    nc, c = _num_chunks(n, c)
    out = lax.map(lambda a: fn(*a), _split_rows(args, nc, c))

    def merge(y):
        y = jnp.moveaxis(y, 0, out_axis)
        shape = y.shape[:out_axis] + (nc * c,) + y.shape[out_axis + 2:]
        return lax.slice_in_dim(y.reshape(shape), 0, n, axis=out_axis)

    return jax.tree_util.tree_map(merge, out)


# --------------------------------------------------------------------------- layers


def _prefix(idx: int | None, name: str) -> str:
    return f"{name}" if idx is None else f"layer {idx} ({name})"


class _Layer:
    """One infinite-width layer; ``serial`` chains them."""

    name = "Layer"
    gaussian_out: bool | None = None  # True/False: output is / is not Gaussian; None: as input

    # shapes -----------------------------------------------------------------
    def out_shape(self, in_shape: tuple[int, ...], where: str) -> tuple[int, ...]:
        return tuple(in_shape)

    # kernels ----------------------------------------------------------------
    def need(self, r_out: tuple[int, ...], in_shape, out_shape) -> tuple[int, ...]:
        """Band radius needed at the input, per spatial dimension, for ``r_out``."""
        return r_out

    def kernel(self, k: _K, in_shape, out_shape, dims_out: tuple[_Dim, ...]) -> _K:
        raise NotImplementedError

    # finite network -----------------------------------------------------------
    def init(self, key, in_shape):
        return self.out_shape(tuple(in_shape), self.name), ()

    def apply(self, params, x):
        raise NotImplementedError


def _check_parameterization(parameterization: str, s) -> str:
    p = str(parameterization).lower()
    if p not in ("ntk", "standard"):
        raise ValueError(
            f"parameterization={parameterization!r} is not supported: use 'ntk' (the default) "
            f"or 'standard'."
        )
    if len(tuple(s)) != 2:
        raise ValueError(f"s={s!r} must be a pair of numbers (the default is (1, 1)).")
    return p


def _check_axes(layer: str, **axes):
    defaults = {"batch_axis": 0, "channel_axis": -1, "batch_axis_out": 0}
    for name, value in axes.items():
        if value != defaults[name]:
            raise ValueError(
                f"{layer}({name}={value!r}) is not supported by kipnb.stax: inputs are "
                f"batch-first and channels-last (NHWC); transpose the data instead."
            )


class _Dense(_Layer):
    name = "Dense"
    gaussian_out = True

    def __init__(self, out_dim, W_std, b_std, parameterization, s):
        self.out_dim = int(out_dim)
        self.W_std = float(W_std)
        self.b_std = None if b_std is None else float(b_std)
        self.parameterization = _check_parameterization(parameterization, s)
        self.s = tuple(s)

    def out_shape(self, in_shape, where):
        if len(in_shape) != 2:
            raise ValueError(
                f"{where} expects 2-D inputs (batch, features) but got {len(in_shape)}-D "
                f"inputs of shape {tuple(in_shape)}. Put Flatten() or GlobalAvgPool() before "
                f"Dense to turn (N, H, W, C) images into vectors, or reshape the data."
            )
        return (in_shape[0], self.width)

    @property
    def width(self) -> int:
        """Finite output width: ``out_dim``, times ``s[1]`` in the standard parameterization."""
        return self.out_dim if self.parameterization == "ntk" else int(self.out_dim * self.s[1])

    def kernel(self, k, in_shape, out_shape, dims_out):
        W2 = self.W_std**2
        b2 = 0.0 if self.b_std is None else self.b_std**2
        arrays = dict(k.arrays)
        ntk_in = arrays.pop("ntk", None)
        out = {name: W2 * x + b2 for name, x in arrays.items()}
        if k.compute_ntk:
            if self.parameterization == "ntk":
                ntk = out["nngp"] if ntk_in is None else out["nngp"] + W2 * ntk_in
            else:
                ntk = in_shape[-1] / self.s[0] * arrays["nngp"]
                if ntk_in is not None:
                    ntk = ntk + W2 * ntk_in
                if self.b_std is not None:
                    ntk = ntk + 1.0
            out["ntk"] = ntk
        return dataclasses.replace(k, arrays=out)

    def init(self, key, in_shape):
        out_shape = self.out_shape(tuple(in_shape), self.name)
        k1, k2 = jax.random.split(key)
        d_in = in_shape[-1]
        W = jax.random.normal(k1, (d_in, self.width))
        b = None if self.b_std is None else jax.random.normal(k2, (1, self.width))
        if self.parameterization == "standard":
            W = W * (self.W_std / (d_in / self.s[0]) ** 0.5)
            b = None if b is None else b * self.b_std
        return out_shape, (W, b)

    def apply(self, params, x):
        W, b = params
        prod = jnp.matmul(x, W.astype(x.dtype), precision=HIGHEST)
        if self.parameterization == "ntk":
            out = self.W_std / x.shape[-1] ** 0.5 * prod
            if b is not None:
                out = out + self.b_std * b
        else:
            out = prod / self.s[0] ** 0.5
            if b is not None:
                out = out + b
        return out


def _tuple(v, n: int, what: str) -> tuple[int, ...]:
    t = tuple(int(a) for a in v)
    if len(t) != n:
        raise ValueError(f"{what}={tuple(v)!r} must have {n} entries, one per spatial dimension.")
    if any(a < 1 for a in t):
        raise ValueError(f"{what}={tuple(v)!r} must be positive integers.")
    return t


def _check_padding(padding: str, layer: str) -> str:
    p = str(padding).upper()
    if p not in ("SAME", "VALID"):
        raise ValueError(
            f"{layer}(padding={padding!r}) is not supported: use 'SAME' or 'VALID' "
            f"(kipnb.stax has no 'CIRCULAR' padding)."
        )
    return p


def _pads(n: int, window: int, stride: int, padding: str) -> tuple[int, int, int]:
    """(output size, pad low, pad high) of a window op along one dimension (lax rules)."""
    if padding == "VALID":
        return (n - window) // stride + 1, 0, 0
    out = -(-n // stride)
    total = max((out - 1) * stride + window - n, 0)
    return out, total // 2, total - total // 2


def _spatial_check(layer: str, where: str, in_shape, n_sp: int, example: str):
    if len(in_shape) != n_sp + 2:
        raise ValueError(
            f"{where} expects {n_sp + 2}-D inputs {example} but got {len(in_shape)}-D inputs "
            f"of shape {tuple(in_shape)}. Reshape flat vectors to images first, e.g. "
            f"x.reshape(-1, 28, 28, 1), or use Dense layers for vector inputs."
        )


_SPECS = {1: "W", 2: "HW", 3: "DHW"}
_EXAMPLES = {1: "(batch, width, channels)", 2: "NHWC (batch, height, width, channels)",
             3: "(batch, depth, height, width, channels)"}


class _Conv(_Layer):
    name = "Conv"
    gaussian_out = True

    def __init__(self, out_chan, filter_shape, strides, padding, W_std, b_std,
                 parameterization, s):
        self.n_sp = len(tuple(filter_shape))
        if self.n_sp not in _SPECS:
            raise ValueError(
                f"Conv(filter_shape={tuple(filter_shape)!r}): kipnb.stax supports 1, 2 or 3 "
                f"spatial dimensions."
            )
        self.out_chan = int(out_chan)
        self.filter_shape = _tuple(filter_shape, self.n_sp, "filter_shape")
        self.strides = (1,) * self.n_sp if strides is None else _tuple(
            strides, self.n_sp, "strides")
        self.padding = _check_padding(padding, "Conv")
        self.W_std = float(W_std)
        self.b_std = None if b_std is None else float(b_std)
        self.parameterization = _check_parameterization(parameterization, s)
        self.s = tuple(s)

    def out_shape(self, in_shape, where):
        _spatial_check("Conv", where, in_shape, self.n_sp, _EXAMPLES[self.n_sp])
        spatial = tuple(in_shape[1:-1])
        if self.padding == "VALID" and any(
                f > n for f, n in zip(self.filter_shape, spatial, strict=True)):
            raise ValueError(
                f"{where}: the filter {self.filter_shape} is larger than the "
                f"{'x'.join(map(str, spatial))} input with padding='VALID', which leaves no "
                f"output pixel. Use padding='SAME', a smaller filter, or fewer pooling layers "
                f"before this Conv."
            )
        out = tuple(_pads(n, f, st, self.padding)[0] for n, f, st in
                    zip(spatial, self.filter_shape, self.strides, strict=True))
        width = self.out_chan if self.parameterization == "ntk" else int(self.out_chan * self.s[1])
        return (in_shape[0], *out, width)

    def need(self, r_out, in_shape, out_shape):
        return tuple(st * r for st, r in zip(self.strides, r_out, strict=True))

    def kernel(self, k, in_shape, out_shape, dims_out):
        targets = tuple(
            _Dim(d.size, False, st * o.r) if not o.full else _Dim(d.size, True, d.size - 1)
            for d, o, st in zip(k.dims, dims_out, self.strides, strict=True))
        k = _retarget(k, targets)
        steps = _steps(k.dims, dims_out, self.filter_shape, self.strides, self.padding)
        band = [st for st in steps if not st.d.full]
        mask = _band_mask(dims_out)

        def conv_mean(x):
            """Mean over filter taps of the input covariance at the shifted pixel pairs."""
            nb = k.nb
            for st in band:  # output offset j needs input offset s * j
                x = _strided(x, nb + 2 * st.i + 1, st.d.r - st.s * st.o.r, st.o.m, st.s)
            if band:  # the filter slides p (and q with it): a window sum along every p axis
                x = _window_sum(x, {nb + 2 * st.i: (st.w, st.s, st.lo, st.hi) for st in band})
            for st in steps:
                if st.d.full:  # both p and q move with the filter tap: a diagonal sum
                    ap, n = nb + 2 * st.i, st.o.size
                    x = _pad_axes(x, [ap, ap + 1], st.lo, st.hi)
                    x = sum(_strided(_strided(x, ap, t, n, st.s), ap + 1, t, n, st.s)
                            for t in range(st.w))
            return _apply_mask(x / math.prod(self.filter_shape), mask)

        W2 = self.W_std**2
        b2 = 0.0 if self.b_std is None else self.b_std**2

        def bias(value, like):
            if mask is None:
                return value
            return value * jnp.asarray(mask, like.dtype)

        arrays = dict(k.arrays)
        ntk_in = arrays.pop("ntk", None)
        means = {name: conv_mean(x) for name, x in arrays.items()}
        out = {name: W2 * m + bias(b2, m) for name, m in means.items()}
        if k.compute_ntk:
            ntk_mean = None if ntk_in is None else conv_mean(ntk_in)
            if self.parameterization == "ntk":
                ntk = out["nngp"] if ntk_mean is None else out["nngp"] + W2 * ntk_mean
            else:
                fan_in = in_shape[-1] * math.prod(self.filter_shape) / self.s[0]
                ntk = fan_in * means["nngp"]
                if ntk_mean is not None:
                    ntk = ntk + W2 * ntk_mean
                if self.b_std is not None:
                    ntk = ntk + bias(1.0, ntk)
            out["ntk"] = ntk
        return dataclasses.replace(k, arrays=out, dims=tuple(dims_out))

    def _dimension_numbers(self):
        sp = _SPECS[self.n_sp]
        return ("N" + sp + "C", sp + "IO", "N" + sp + "C")

    def init(self, key, in_shape):
        out_shape = self.out_shape(tuple(in_shape), self.name)
        k1, k2 = jax.random.split(key)
        c_in = in_shape[-1]
        width = out_shape[-1]
        W = jax.random.normal(k1, (*self.filter_shape, c_in, width))
        b = None if self.b_std is None else jax.random.normal(k2, (1,) * (self.n_sp + 1) + (width,))
        if self.parameterization == "standard":
            fan_in = c_in * math.prod(self.filter_shape)
            W = W * (self.W_std / (fan_in / self.s[0]) ** 0.5)
            b = None if b is None else b * self.b_std
        return out_shape, (W, b)

    def apply(self, params, x):
        W, b = params
        out = lax.conv_general_dilated(
            x, W.astype(x.dtype), self.strides, self.padding,
            dimension_numbers=self._dimension_numbers(), precision=HIGHEST)
        if self.parameterization == "ntk":
            fan_in = x.shape[-1] * math.prod(self.filter_shape)
            out = self.W_std / fan_in**0.5 * out
            if b is not None:
                out = out + self.b_std * b
        else:
            out = out / self.s[0] ** 0.5
            if b is not None:
                out = out + b
        return out


class _Step(NamedTuple):
    """One spatial dimension of a window layer: input/output storage, window, stride, pads."""

    i: int
    d: _Dim
    o: _Dim
    w: int
    s: int
    lo: int
    hi: int


def _steps(dims_in, dims_out, windows, strides, padding) -> list[_Step]:
    steps = []
    for i, (d, o, w, st) in enumerate(zip(dims_in, dims_out, windows, strides, strict=True)):
        n_out, lo, hi = _pads(d.size, w, st, padding)
        assert n_out == o.size and d.full == o.full
        steps.append(_Step(i, d, o, w, st, lo, hi))
    return steps


def _window_counts(n: int, window: int, stride: int, padding: str) -> np.ndarray:
    n_out, lo, _ = _pads(n, window, stride, padding)
    start = np.arange(n_out) * stride - lo
    return (np.minimum(start + window, n) - np.maximum(start, 0)).astype(np.float64)


class _AvgPool(_Layer):
    name = "AvgPool"

    def __init__(self, window_shape, strides, padding, normalize_edges):
        self.n_sp = len(tuple(window_shape))
        if self.n_sp not in _SPECS:
            raise ValueError("AvgPool supports 1, 2 or 3 spatial dimensions.")
        self.window = _tuple(window_shape, self.n_sp, "window_shape")
        self.strides = (1,) * self.n_sp if strides is None else _tuple(
            strides, self.n_sp, "strides")
        self.padding = _check_padding(padding, "AvgPool")
        self.normalize_edges = bool(normalize_edges)

    def out_shape(self, in_shape, where):
        _spatial_check("AvgPool", where, in_shape, self.n_sp, _EXAMPLES[self.n_sp])
        spatial = tuple(in_shape[1:-1])
        if self.padding == "VALID" and any(
                w > n for w, n in zip(self.window, spatial, strict=True)):
            raise ValueError(
                f"{where}: the pooling window {self.window} is larger than the "
                f"{'x'.join(map(str, spatial))} image it pools (padding='VALID'). Use a "
                f"smaller window, fewer pooling layers, larger images, or padding='SAME'."
            )
        out = tuple(_pads(n, w, st, self.padding)[0] for n, w, st in
                    zip(spatial, self.window, self.strides, strict=True))
        return (in_shape[0], *out, in_shape[-1])

    def need(self, r_out, in_shape, out_shape):
        return tuple(st * r + w - 1 for st, r, w in
                     zip(self.strides, r_out, self.window, strict=True))

    def _divisor(self, dims_in, dims_out) -> np.ndarray | float:
        if not (self.normalize_edges and self.padding == "SAME"):
            return float(math.prod(self.window)) ** 2
        div = np.ones(())
        for d, o, w, st in zip(dims_in, dims_out, self.window, self.strides, strict=True):
            c = _window_counts(d.size, w, st, self.padding)
            if o.full:
                cq = c[None, :]
            else:
                q = np.arange(o.size)[:, None] + np.arange(o.m)[None, :] - o.r
                cq = np.where((q >= 0) & (q < o.size), c[np.clip(q, 0, o.size - 1)], 1.0)
            div = np.multiply.outer(div, c[:, None] * cq)
        return div

    def kernel(self, k, in_shape, out_shape, dims_out):
        targets = tuple(
            _Dim(d.size, False, st * o.r + w - 1) if not o.full else _Dim(d.size, True, d.size - 1)
            for d, o, st, w in zip(k.dims, dims_out, self.strides, self.window, strict=True))
        k = _retarget(k, targets)
        steps = _steps(k.dims, dims_out, self.window, self.strides, self.padding)
        band = [st for st in steps if not st.d.full]
        mask = _band_mask(dims_out)
        div = self._divisor(k.dims, dims_out)

        def pool(x, nb, name):
            full = {}
            for st in steps:  # full storage: p and q pool independently
                if st.d.full:
                    full[nb + 2 * st.i] = full[nb + 2 * st.i + 1] = (st.w, st.s, st.lo, st.hi)
            if full:
                x = _slice_sum(x, full)
            if band:
                for st in band:
                    x = _pad_axes(x, [nb + 2 * st.i], st.lo, st.hi)
                # K'[P, j] = sum_{t, t'} K[sP + t, base + s j + t' - t]: sum over t' first,
                x = _slice_sum(x, {nb + 2 * st.i + 1: (st.w, 1, 0, 0) for st in band})
                for st in band:  # then over t, which moves p and j
                    ap, base = nb + 2 * st.i, st.d.r - st.s * st.o.r
                    x = sum(_strided(_strided(x, ap, t, st.o.size, st.s), ap + 1, base - t,
                                     st.o.m, st.s) for t in range(st.w))
            if isinstance(div, float):
                x = x / div
            else:
                x = x / jnp.asarray(div, x.dtype)
            return _apply_mask(x, mask)

        return k.map(pool, dims=tuple(dims_out))

    def apply(self, params, x):
        dims = (1,) + self.window + (1,)
        strides = (1,) + self.strides + (1,)
        out = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, dims, strides, self.padding)
        if self.normalize_edges and self.padding == "SAME":
            ones = jnp.ones((1, *x.shape[1:-1], 1), x.dtype)
            counts = lax.reduce_window(ones, np.zeros((), x.dtype), lax.add, dims, strides,
                                       self.padding)
            return out / counts
        return out / math.prod(self.window)


class _GlobalAvgPool(_Layer):
    name = "GlobalAvgPool"

    def out_shape(self, in_shape, where):
        if len(in_shape) < 3:
            raise ValueError(
                f"{where} expects inputs with spatial dimensions, e.g. NHWC (batch, height, "
                f"width, channels), but got {len(in_shape)}-D inputs of shape "
                f"{tuple(in_shape)}. Remove GlobalAvgPool from dense networks."
            )
        return (in_shape[0], in_shape[-1])

    def need(self, r_out, in_shape, out_shape):
        return tuple(n - 1 for n in in_shape[1:-1])

    def kernel(self, k, in_shape, out_shape, dims_out):
        dims = k.dims
        assert all(d.full for d in dims)
        area = math.prod(d.size for d in dims)

        def pool(x, nb, name):
            axes = tuple(range(nb, x.ndim))
            return jnp.sum(x, axis=axes) / area**2

        return k.map(pool, dims=())

    def apply(self, params, x):
        return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


class _Flatten(_Layer):
    name = "Flatten"
    gaussian_out = False

    def out_shape(self, in_shape, where):
        if len(in_shape) < 2:
            raise ValueError(f"{where} expects at least 2-D inputs, got shape {tuple(in_shape)}.")
        return (in_shape[0], math.prod(in_shape[1:]))

    def need(self, r_out, in_shape, out_shape):
        return (0,) * (len(in_shape) - 2)

    def kernel(self, k, in_shape, out_shape, dims_out):
        dims = k.dims

        def flatten(x, nb, name):
            for i in reversed(range(len(dims))):
                ap, d = nb + 2 * i, dims[i]
                if d.full:
                    x = jnp.trace(x, axis1=ap, axis2=ap + 1) / d.size
                else:
                    x = jnp.mean(lax.index_in_dim(x, d.r, axis=ap + 1, keepdims=False), axis=ap)
            return x

        return k.map(flatten, dims=())

    def apply(self, params, x):
        return x.reshape(x.shape[0], -1)


class _Identity(_Layer):
    name = "Identity"

    def kernel(self, k, in_shape, out_shape, dims_out):
        return k

    def apply(self, params, x):
        return x


class _Elementwise(_Layer):
    """A nonlinearity ``phi``: NNGP ``E[phi(u) phi(v)]``, NTK ``ntk * E[phi'(u) phi'(v)]``."""

    gaussian_out = False

    def fn(self, x):
        raise NotImplementedError

    def cross(self, k12, k11, k22, want_dot: bool, ulps: float = _BOUNDARY_ULPS):
        """Returns (new k12, derivative kernel or None) from covariance and variances."""
        raise NotImplementedError

    def apply(self, params, x):
        return self.fn(x)

    def kernel(self, k, in_shape, out_shape, dims_out):
        dims = k.dims
        mask = _band_mask(dims)
        if k.nb == 1:  # self pass: record the variances the cross pass will need
            cov = k.arrays["cov"]
            v = _diag(cov, dims)
            k.variances[k.index] = v
            out, _ = self.cross(cov, _at_p(v, dims), _at_q(v, dims), False, k.ulps)
            return dataclasses.replace(k, arrays={"cov": _apply_mask(out, mask)})
        v1p, v2q = k.variances[k.index]
        ntk_in = k.arrays.get("ntk")
        want_dot = k.compute_ntk and ntk_in is not None
        nngp, dot = self.cross(k.arrays["nngp"], v1p[:, None], v2q[None], want_dot, k.ulps)
        out = {"nngp": _apply_mask(nngp, mask)}
        if want_dot:
            out["ntk"] = _apply_mask(ntk_in * dot, mask)
        return dataclasses.replace(k, arrays=out)


class _ABRelu(_Elementwise):
    def __init__(self, a, b, name):
        self.a, self.b, self.name = float(a), float(b), name

    def fn(self, x):
        return self.a * jnp.minimum(x, 0) + self.b * jnp.maximum(x, 0)

    def cross(self, k12, k11, k22, want_dot, ulps=_BOUNDARY_ULPS):
        return _arccos_cross(k12, k11, k22, self.a, self.b, float(ulps), bool(want_dot))


def _mul_sum_to(a, b, shape):
    """``sum(a * b)`` over the axes broadcast away in ``shape``, as one ``dot_general``.

    The gradient of a broadcast variance (``k11`` of shape ``(N1, 1, ...)`` against the
    pair axes ``(N1, N2, ...)``). Written as an einsum (pixels as batch axes, the
    broadcast pair axis contracted) rather than a multiply followed by ``sum``: XLA's CPU
    backend (jaxlib 0.10) hands such reductions to its YNNPACK reduce, which on the 2-core
    test machine took ~10 ms in float32 (2 ms in float64) for 784k entries where the
    einsum takes under 1 ms; it made the 'Conv' KIP step's float32 gradient slower than
    its float64 one.
    """
    nd = a.ndim
    shape = (1,) * (nd - len(shape)) + tuple(shape)
    b = jnp.reshape(b, (1,) * (nd - jnp.ndim(b)) + tuple(jnp.shape(b)))
    reduced = [i for i in range(nd) if shape[i] == 1 and a.shape[i] != 1]
    if not reduced:
        return (a * b).reshape(shape)
    out_axes = [i for i in range(nd) if i not in reduced]
    b_axes = [i for i in range(nd) if b.shape[i] != 1]
    b_sq = b.reshape(tuple(b.shape[i] for i in b_axes))
    out = jnp.einsum(a, list(range(nd)), b_sq, b_axes, out_axes, precision=HIGHEST)
    return out.reshape(shape)


@jax.custom_vjp
def _bmul(a, b):
    """``a * b`` with broadcasting whose VJP reduces by :func:`_mul_sum_to`."""
    return a * b


def _bmul_fwd(a, b):
    return a * b, (a, b)


def _bmul_bwd(res, g):
    a, b = res
    return _mul_sum_to(g, b, jnp.shape(a)), _mul_sum_to(g, a, jnp.shape(b))


_bmul.defvjp(_bmul_fwd, _bmul_bwd)


def _arccos_parts(k12, k11, k22, ulps):
    prod = k11 * k22
    gap = prod - k12 * k12
    # Within rounding of the boundary (|correlation| == 1, e.g. an image paired with
    # itself) treat the pair as exactly aligned: the angle is then exact instead of
    # sqrt(eps)-noisy, and its derivative is the subgradient 0 instead of ~1/sqrt(eps).
    gap = jnp.where(gap <= ulps * jnp.finfo(gap.dtype).eps * prod, 0.0, gap)
    root = jnp.sqrt(gap)
    angle = _safe_arctan2(root, k12, math.pi / 2)
    return gap, root, angle


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _arccos_cross(k12, k11, k22, a, b, ulps, want_dot):
    """The arc-cosine kernel of ``a * min(x, 0) + b * max(x, 0)``: (nngp, dot or None).

    ``nngp = f * root + dot * k12`` and ``dot = (a**2 + b**2) / 2 - f * angle`` with
    ``f = (a - b)**2 / (2 pi)``, ``root = sqrt(k11 k22 - k12**2)`` (snapped to 0 within
    rounding of the boundary) and ``angle = arctan2(root, k12)``. The VJP is written out
    (the derivatives neural-tangents' ``_sqrt``/``_arctan2`` rules give: 0 through the
    square root at ``root == 0``, a floored ``arctan2`` denominator) and recomputes the
    angle from the inputs, so the forward pass keeps no elementwise residuals but the
    inputs and XLA fuses each pass into a few loops (the FC-3 gradient and the FC-1 KIP
    step were ~1.3-2x faster than autodiff through the where-chains, and compiled faster).
    """
    _, root, angle = _arccos_parts(k12, k11, k22, ulps)
    factor = (a - b) ** 2 / (2 * math.pi)
    dot = (a * a + b * b) / 2 - factor * angle
    return factor * root + dot * k12, (dot if want_dot else None)


def _arccos_cross_fwd(k12, k11, k22, a, b, ulps, want_dot):
    return _arccos_cross(k12, k11, k22, a, b, ulps, want_dot), (k12, k11, k22)


def _arccos_cross_bwd(a, b, ulps, want_dot, res, cts):
    k12, k11, k22 = res
    g_nngp, g_dot = cts
    # One value of the root per pair: XLA may otherwise recompute ``k11 * k22 - k12**2``
    # in two fusions with different rounding (an FMA in one), giving root == 0 where the
    # guard below saw a positive gap: an infinite derivative (seen in ConvNet-kernel KIP
    # on Fashion-MNIST). The guard tests the root itself.
    _, root, angle = jax.lax.optimization_barrier(_arccos_parts(k12, k11, k22, ulps))
    factor = (a - b) ** 2 / (2 * math.pi)
    dot = (a * a + b * b) / 2 - factor * angle
    g_dot = g_nngp * k12 if g_dot is None else g_dot + g_nngp * k12
    g_angle = -factor * g_dot
    denom = jnp.maximum(k12 * k12 + root * root, _TINY)  # _safe_arctan2's JVP
    g_root = factor * g_nngp + g_angle * k12 / denom
    positive = root * root > _TINY  # _safe_sqrt's JVP: derivative 0 at the boundary
    g_gap = jnp.where(positive, g_root / (2.0 * jnp.where(positive, root, 1.0)), 0.0)
    g_k12 = g_nngp * dot - g_angle * root / denom - 2.0 * k12 * g_gap
    return (g_k12, _mul_sum_to(g_gap, k22, jnp.shape(k11)),
            _mul_sum_to(g_gap, k11, jnp.shape(k22)))


_arccos_cross.defvjp(_arccos_cross_fwd, _arccos_cross_bwd)


class _Erf(_Elementwise):
    name = "Erf"

    def __init__(self, a, b, c):
        self.a, self.b, self.c = float(a), float(b), float(c)

    def fn(self, x):
        return self.a * jax.scipy.special.erf(self.b * x) + self.c

    def cross(self, k12, k11, k22, want_dot, ulps=_BOUNDARY_ULPS):
        del ulps  # the Erf kernel has no boundary singularity in its value
        b2 = self.b**2
        k12, k11, k22 = b2 * k12, b2 * k11, b2 * k22
        prod = (1 + 2 * k11) * (1 + 2 * k22)
        root = _safe_sqrt(prod - 4 * k12 * k12)
        nngp = (2 / math.pi) * jnp.arctan2(2 * k12, root)
        dot = None
        if want_dot:
            dot = b2 * self.a**2 * (4 / math.pi) / root
        return self.a**2 * nngp + self.c**2, dot


# --------------------------------------------------------------------------- Gelu, LayerNorm


class _Gelu(_Elementwise):
    """``x * Phi(x)``: closed-form kernels of Tsuchida et al. (2020), as neural-tangents.

    With ``P = k11 * k22``, ``P1 = (1 + k11) * (1 + k22)``, ``D = sqrt(P1 - k12**2)``
    (always positive: no boundary singularity) and ``theta = arctan2(k12, D)``:

    * NNGP ``k12 / 4 + (k12 * theta + (k12**2 + P * D**2) / (P1 * D)) / (2 pi)``;
    * derivative kernel ``1/4 + theta / (2 pi)
      + k12 / (2 pi D) * (1 / D**2 + (1 - P) / P1 + 1)``.
    """

    name = "Gelu"

    def __init__(self, approximate: bool):
        self.approximate = bool(approximate)

    def fn(self, x):
        return jax.nn.gelu(x, approximate=self.approximate)

    def cross(self, k12, k11, k22, want_dot, ulps=_BOUNDARY_ULPS):
        del ulps  # D >= 1: the Gelu kernel has no boundary singularity
        prod = k11 * k22
        prod1 = (k11 + 1.0) * (k22 + 1.0)
        delta2 = prod1 - k12 * k12
        delta = jnp.sqrt(delta2)
        angle = _safe_arctan2(k12, delta, 0.0)
        nngp = ((k12 * k12 + prod * delta2) / (prod1 * delta) + k12 * angle) / (2 * math.pi)
        nngp = nngp + 0.25 * k12
        dot = None
        if want_dot:
            first = (1.0 / delta2 + (1.0 - prod) / prod1 + 1.0) * k12 / delta / (2 * math.pi)
            dot = first + 0.25 + angle / (2 * math.pi)
        return nngp, dot


class _LayerNorm(_Elementwise):
    """Normalisation by the (spatially averaged) variance; Gaussian in, Gaussian out.

    The kernel divides the covariance of pixels ``p`` (of ``x1``) and ``q`` (of ``x2``)
    by ``sqrt((eps + v1(p)) * (eps + v2(q)))``, where ``v(p)`` is the variance at ``p``,
    averaged over the spatial axes in ``axis`` (the channel mean subtracted by the finite
    layer vanishes at infinite width). The NTK is divided by the same factor. The self
    pass records ``1 / sqrt(eps + v)`` per pixel, which the cross pass reads at ``p`` and
    ``q`` like a nonlinearity's variances (zero outside the image, where the band
    covariance is zero too).
    """

    name = "LayerNorm"
    gaussian_out = None  # keeps Gaussianity (as neural-tangents' LayerNorm)

    def __init__(self, axis, eps: float):
        self.axis = (int(axis),) if isinstance(axis, (int, np.integer)) else tuple(
            int(a) for a in axis)
        self.eps = float(eps)

    def _spatial_axes(self, ndim: int, where: str = "LayerNorm") -> tuple[int, ...]:
        """The spatial axes (1 .. ndim-2) normalised over; checks the channel/batch axes."""
        axes = sorted({a % ndim for a in self.axis})
        if any(not -ndim <= a < ndim for a in self.axis):
            raise ValueError(f"{where}: axis={self.axis} is out of range for {ndim}-D inputs.")
        if ndim - 1 not in axes:
            raise ValueError(
                f"{where}: axis={self.axis} does not include the channel axis (-1). The "
                f"infinite-width kernel needs the normalisation over channels (as in "
                f"neural-tangents); e.g. LayerNorm(axis=-1) per pixel or "
                f"LayerNorm(axis=(1, 2, 3)) over NHWC images. (Instance norm, axis=(1, 2), "
                f"has no infinite-width kernel.)"
            )
        if 0 in axes:
            raise ValueError(
                f"{where}: axis={self.axis} includes the batch axis 0; kipnb.stax normalises "
                f"each input on its own. Drop 0 from axis."
            )
        return tuple(a for a in axes if a != ndim - 1)

    def need(self, r_out, in_shape, out_shape):
        self._spatial_axes(len(in_shape))  # a clear error before tracing
        return r_out

    def apply(self, params, x):
        axes = tuple(sorted({a % x.ndim for a in self.axis}))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)
        return (x - mean) / jnp.sqrt(self.eps + var)

    def kernel(self, k, in_shape, out_shape, dims_out):
        dims = k.dims
        if k.nb == 1:
            cov = k.arrays["cov"]
            v = _diag(cov, dims)  # (N, P0, P1, ...)
            spatial = self._spatial_axes(len(in_shape))  # input axis a -> v axis a
            n = self.eps + v
            if spatial:
                n = jnp.broadcast_to(jnp.mean(n, axis=spatial, keepdims=True), v.shape)
            r = lax.rsqrt(n)
            k.variances[k.index] = r
            return dataclasses.replace(k, arrays={"cov": cov * _at_p(r, dims) * _at_q(r, dims)})
        r1p, r2q = k.variances[k.index]
        scale = r1p[:, None] * r2q[None]
        return k.map(lambda x, nb, name: x * scale)


# --------------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts about one network on one input shape."""

    shapes: tuple[tuple[int, ...], ...]  # input shape of every layer, then the output shape
    dims: tuple[tuple[_Dim, ...], ...]  # storage of every boundary's covariance
    nonlinear: tuple[int, ...]  # indices of the nonlinearities

    def entries(self, upto: int | None = None) -> int:
        """Largest number of stored covariance entries per image pair, over boundaries."""
        dims = self.dims if upto is None else self.dims[:upto + 1]
        return max(math.prod(d.size * d.m for d in ds) for ds in dims)


def _make_plan(layers: tuple[_Layer, ...], shape1, shape2) -> _Plan:
    shape1, shape2 = tuple(shape1), tuple(shape2)
    if len(shape1) < 2 or len(shape2) < 2:
        raise ValueError(
            f"kernel_fn expects batches of inputs, at least 2-D (batch, features), but got "
            f"x1 of shape {shape1} and x2 of shape {shape2}; add a batch dimension, e.g. x[None]."
        )
    if shape1[1:] != shape2[1:]:
        raise ValueError(
            f"x1 and x2 must agree in every dimension but the first (batch) one, but "
            f"x1.shape={shape1} and x2.shape={shape2} (a channel/feature or image size "
            f"mismatch). Preprocess both sets the same way."
        )
    shapes = [shape1]
    gaussian = False
    for i, layer in enumerate(layers):
        where = _prefix(i, layer.name)
        shapes.append(tuple(layer.out_shape(shapes[-1], where)))
        if isinstance(layer, _Elementwise) and not gaussian:
            raise ValueError(
                f"{where}: the input to a nonlinearity must be Gaussian, i.e. come from a "
                f"Dense or Conv layer (possibly followed by pooling); add Dense/Conv before "
                f"{layer.name}."
            )
        if layer.gaussian_out is not None:
            gaussian = layer.gaussian_out
    # Backwards: the band radius each boundary must provide, per spatial dimension.
    radii = [()] * len(shapes)
    radii[-1] = tuple(n - 1 for n in shapes[-1][1:-1])
    for i in reversed(range(len(layers))):
        r = layers[i].need(radii[i + 1], shapes[i], shapes[i + 1])
        radii[i] = tuple(min(rr, n - 1) for rr, n in zip(r, shapes[i][1:-1], strict=True))
    dims = tuple(tuple(_make_dim(n, r) for n, r in zip(s[1:-1], rad, strict=True))
                 for s, rad in zip(shapes, radii, strict=True))
    nonlinear = tuple(i for i, layer in enumerate(layers) if isinstance(layer, _Elementwise))
    return _Plan(tuple(shapes), dims, nonlinear)


def _self_pass(layers, plan: _Plan, x) -> dict:
    """Per nonlinearity, the per-pixel variances ``(N, P0, P1, ...)`` of its input."""
    if not plan.nonlinear:
        return {}
    last = plan.nonlinear[-1]
    dims0 = plan.dims[0]
    per_image = plan.entries(last) * x.dtype.itemsize
    dense = all(not ds for ds in plan.dims)

    def block(xb):
        cov = _input_covariance(xb, _at_q(xb, dims0), dims0, nb=1)
        k = _K({"cov": cov}, 1, dims0, False, {}, ulps=boundary_ulps(x.shape[-1]))
        for i in range(last + 1):
            k.index = i
            k = layers[i].kernel(k, plan.shapes[i], plan.shapes[i + 1], plan.dims[i + 1])
            if k.dims != plan.dims[i + 1]:
                k = _retarget(k, plan.dims[i + 1])
        return k.variances

    c = max(1, _block_bytes(dense) // per_image)
    if x.shape[0] > c:  # under jax.grad, recompute each chunk instead of storing it
        block = jax.checkpoint(block)
    return _chunked(block, (x,), x.shape[0], c)


def _cross_pass(layers, plan: _Plan, x1, x2, var1: dict, var2: dict, compute_ntk: bool):
    dims0 = plan.dims[0]
    per_pair = plan.entries() * x1.dtype.itemsize
    n1, n2 = x1.shape[0], x2.shape[0]
    budget = _block_bytes(all(not ds for ds in plan.dims))
    c2 = max(1, min(n2, budget // per_pair))
    c1 = max(1, budget // (per_pair * c2))
    remat = n1 > c1 or n2 > c2  # chunked: under jax.grad recompute blocks, store inputs only

    def outer(x2b, v2b):
        x2q = _at_q(x2b, dims0)
        v2q = {i: _at_q(v, plan.dims[i]) for i, v in v2b.items()}

        def inner(x1b, v1b):
            nngp = _input_covariance(x1b, x2q, dims0, nb=2)
            variances = {i: (_at_p(v, plan.dims[i]), v2q[i]) for i, v in v1b.items()}
            k = _K({"nngp": nngp}, 2, dims0, compute_ntk, variances,
                   ulps=boundary_ulps(x1b.shape[-1]))
            for i, layer in enumerate(layers):
                k.index = i
                k = layer.kernel(k, plan.shapes[i], plan.shapes[i + 1], plan.dims[i + 1])
                if k.dims != plan.dims[i + 1]:
                    k = _retarget(k, plan.dims[i + 1])
            nngp = k.arrays["nngp"]
            ntk = k.arrays.get("ntk", jnp.zeros_like(nngp)) if compute_ntk else None
            return nngp, ntk

        return _chunked(jax.checkpoint(inner) if remat else inner, (x1, var1), n1, c1,
                        out_axis=0)

    return _chunked(outer, (x2, var2), n2, c2, out_axis=1)


def _kernel_fn_for(layers: tuple[_Layer, ...]):
    """The ``kernel_fn(x1, x2=None, get=None)`` of a chain of layers."""

    full_layers = layers
    # A leading Flatten of the raw input: flatten the images first, so the input
    # covariance is one (N1, D) x (D, N2) matmul (``sum / D``, the same value) instead
    # of per-pixel products that are summed afterwards (FC kernels on images: ~100x less
    # memory traffic, and far faster gradients).
    lead_flatten = bool(layers) and isinstance(layers[0], _Flatten)
    if lead_flatten:
        layers = layers[1:]

    @functools.partial(jax.jit, static_argnames=("fields",))
    def core(x1, x2, fields):
        same = x2 is None
        x2 = x1 if same else x2
        if lead_flatten:
            x1, x2 = x1.reshape(x1.shape[0], -1), x2.reshape(x2.shape[0], -1)
        plan = _make_plan(layers, x1.shape, x2.shape)
        dtype = jnp.result_type(x1.dtype, x2.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.result_type(float)
        x1, x2 = x1.astype(dtype), x2.astype(dtype)
        if same:
            var1 = var2 = _self_pass(layers, plan, x1)
        elif all(not ds for ds in plan.dims):  # dense: cheap, unchunked; no concatenation
            var1, var2 = _self_pass(layers, plan, x1), _self_pass(layers, plan, x2)
        else:  # one self pass over both sets (one compiled loop, not two)
            var = _self_pass(layers, plan, jnp.concatenate([x1, x2], axis=0))
            n1 = x1.shape[0]
            var1 = {i: v[:n1] for i, v in var.items()}
            var2 = {i: v[n1:] for i, v in var.items()}
        nngp, ntk = _cross_pass(layers, plan, x1, x2, var1, var2, "ntk" in fields)
        out = {"nngp": nngp, "ntk": ntk}
        return tuple(out[f] for f in fields)

    def kernel_fn(x1, x2=None, get=None):
        fields, single = _canonical_get(get)
        x1 = jnp.asarray(x1)
        x2 = None if x2 is None else jnp.asarray(x2)
        # Shape errors are raised here, before tracing, with the shapes the user passed.
        _make_plan(full_layers, x1.shape, x1.shape if x2 is None else x2.shape)
        out = core(x1, x2, fields)
        if single:
            return out[0]
        return _kernel_type(fields)(*out)

    return kernel_fn


def _layer_triple(layers: tuple[_Layer, ...]):
    def init_fn(key, input_shape):
        shape = tuple(input_shape)
        params = []
        for layer in layers:
            key, sub = jax.random.split(key)
            shape, p = layer.init(sub, shape)
            params.append(p)
        return shape, params

    def apply_fn(params, inputs, **kwargs):
        _check_apply_kwargs(kwargs)
        x = jnp.asarray(inputs)
        if len(params) != len(layers):
            raise ValueError(f"apply_fn got {len(params)} parameter groups for {len(layers)} "
                             f"layers; pass the params returned by this network's init_fn.")
        for i, (layer, p) in enumerate(zip(layers, params, strict=True)):
            layer.out_shape(tuple(x.shape), _prefix(i, layer.name))
            x = layer.apply(p, x)
        return x

    kernel_fn = _kernel_fn_for(layers)
    kernel_fn._kipnb_layers = layers
    return init_fn, apply_fn, kernel_fn


def _check_apply_kwargs(kwargs: dict) -> None:
    """neural-tangents passes ``rng`` (and layer-specific keywords such as a dropout's
    ``mask``) through ``apply_fn``; kipnb's layers are deterministic, so ``rng`` is
    accepted and unused, and any other keyword is an error rather than silently dropped."""
    unknown = sorted(set(kwargs) - {"rng"})
    if unknown:
        raise TypeError(
            f"apply_fn got unexpected keyword argument(s) {unknown}: kipnb.stax layers take "
            "only (params, inputs) and an optional rng=, which they do not use (no layer "
            "here is random)."
        )


def _single(layer: _Layer):
    init_fn, apply_fn, kernel_fn = _layer_triple((layer,))

    def init_one(key, input_shape):
        shape, params = init_fn(key, input_shape)
        return shape, params[0]

    def apply_one(params, inputs, **kwargs):
        return apply_fn([params], inputs, **kwargs)

    return init_one, apply_one, kernel_fn


def serial(*layers):
    """Combinator composing layers in sequence (``neural_tangents.stax.serial``).

    The kernels compose: each layer maps its input's NNGP/NTK to its output's, so
    ``kernel_fn`` of ``serial(A, B)`` is ``B``'s kernel map applied after ``A``'s.

    Args:
      *layers: ``(init_fn, apply_fn, kernel_fn)`` triples made by this module (layers or
        other ``serial`` networks).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)`` of the chain; ``init_fn``'s params are a list
      with one entry per argument.

    Example:
      >>> import jax, numpy as np
      >>> init_fn, apply_fn, kernel_fn = serial(Dense(16), Relu(), Dense(3))
      >>> out_shape, params = init_fn(jax.random.PRNGKey(0), (5, 4))
      >>> out_shape, len(params), apply_fn(params, np.ones((5, 4))).shape
      ((5, 3), 3, (5, 3))
      >>> kernel_fn(np.ones((5, 4)), np.ones((2, 4)), "ntk").shape
      (5, 2)
    """
    chain = []
    for i, triple in enumerate(layers):
        inner = getattr(triple[2], "_kipnb_layers", None) if isinstance(triple, tuple) and len(
            triple) == 3 else None
        if inner is None:
            raise ValueError(
                f"serial argument {i} is not a kipnb.stax layer: pass the (init_fn, apply_fn, "
                f"kernel_fn) triples returned by kipnb.stax constructors, not neural_tangents "
                f"layers."
            )
        chain.append(tuple(inner))
    flat = tuple(layer for group in chain for layer in group)
    init_flat, apply_flat, kernel_fn = _layer_triple(flat)
    sizes = [len(g) for g in chain]

    def _split(params):
        out, start = [], 0
        for n in sizes:
            out.append(params[start:start + n])
            start += n
        return out

    def init_fn(key, input_shape):
        shape = tuple(input_shape)
        params = []
        for (sub_init, _, _) in layers:
            key, sub = jax.random.split(key)
            shape, p = sub_init(sub, shape)
            params.append(p)
        return shape, params

    def apply_fn(params, inputs, **kwargs):
        if len(params) != len(layers):
            raise ValueError(f"apply_fn got {len(params)} parameter groups for {len(layers)} "
                             f"layers; pass the params returned by this network's init_fn.")
        x = inputs
        for (_, sub_apply, _), p in zip(layers, params, strict=True):
            x = sub_apply(p, x, **kwargs)
        return x

    return init_fn, apply_fn, kernel_fn


def Dense(out_dim: int, W_std: float = 1.0, b_std: float | None = None, batch_axis: int = 0,
          channel_axis: int = -1, parameterization: str = "ntk", s=(1, 1)):
    r"""Fully-connected layer on ``(N, D)`` inputs (``neural_tangents.stax.Dense``).

    NTK parameterization: ``y = W_std / sqrt(D) * x @ W + b_std * b`` with standard
    normal ``W, b``; ``'standard'`` draws ``W ~ N(0, W_std**2 / (D / s[0]))``,
    ``b ~ N(0, b_std**2)``. The kernels (NTK parameterization) are

    .. math::

        \mathcal{K}' = \sigma_w^2 \mathcal{K} + \sigma_b^2, \qquad
        \Theta' = \mathcal{K}' + \sigma_w^2 \Theta,

    and in the standard parameterization the NTK gains ``D / s[0] * nngp_in`` (``+ 1``
    with a bias) instead of ``nngp_out``.

    Args:
      out_dim: output width of the finite layer (the kernels do not depend on it).
      W_std: weight standard deviation :math:`\sigma_w`.
      b_std: bias standard deviation :math:`\sigma_b`; ``None`` means no bias.
      batch_axis: must be ``0``.
      channel_axis: must be ``-1``.
      parameterization: ``'ntk'`` or ``'standard'``.
      s: the ``(s_in, s_out)`` width multipliers of the standard parameterization.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> _, _, kernel_fn = Dense(1, W_std=2.0, b_std=0.5)
      >>> k = kernel_fn(np.array([[1.0, 1.0], [1.0, -1.0]]))
      >>> k.nngp.tolist(), k.ntk.tolist()  # 4 * x1 . x2 / 2 + 0.25; NTK = NNGP (one layer)
      ([[4.25, 0.25], [0.25, 4.25]], [[4.25, 0.25], [0.25, 4.25]])
    """
    _check_axes("Dense", batch_axis=batch_axis, channel_axis=channel_axis)
    return _single(_Dense(out_dim, W_std, b_std, parameterization, s))


def Conv(out_chan: int, filter_shape: Sequence[int], strides: Sequence[int] | None = None,
         padding: str = "VALID", W_std: float = 1.0, b_std: float | None = None,
         dimension_numbers=None, parameterization: str = "ntk", s=(1, 1)):
    r"""Convolution on channels-last inputs (``neural_tangents.stax.Conv``).

    ``padding`` is ``'SAME'`` or ``'VALID'``; ``strides=None`` means 1. Weights are
    ``filter_shape + (in_chan, out_chan)`` (HWIO); the NTK-parameterized output is
    ``W_std / sqrt(in_chan * prod(filter_shape)) * conv(x, W) + b_std * b``. The NNGP
    between pixels ``p`` and ``q`` averages the input covariance over the filter window
    shifted along both:

    .. math::

        \mathcal{K}'(p, q) = \frac{\sigma_w^2}{|w|} \sum_{t \in w}
            \mathcal{K}(s p + t, s q + t) + \sigma_b^2,

    and the NTK follows the same map plus ``nngp_out`` (as :func:`Dense`).

    Args:
      out_chan: output channels of the finite layer.
      filter_shape: the window, e.g. ``(3, 3)`` (1-3 spatial dimensions).
      strides: per spatial dimension; ``None`` means 1.
      padding: ``'SAME'`` or ``'VALID'``.
      W_std: weight standard deviation.
      b_std: bias standard deviation; ``None`` means no bias.
      dimension_numbers: ``None`` or the channels-last default, e.g.
        ``('NHWC', 'HWIO', 'NHWC')``.
      parameterization: ``'ntk'`` or ``'standard'``.
      s: width multipliers of the standard parameterization.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import jax, numpy as np
      >>> init_fn, apply_fn, kernel_fn = serial(Conv(8, (3, 3), padding="SAME"), Relu(),
      ...                                       Flatten(), Dense(1))
      >>> x = np.ones((2, 5, 5, 3))
      >>> apply_fn(init_fn(jax.random.PRNGKey(0), x.shape)[1], x).shape
      (2, 1)
      >>> kernel_fn(x, None, "nngp").shape
      (2, 2)
    """
    if dimension_numbers is not None:
        spec = _SPECS.get(len(tuple(filter_shape)), "")
        if tuple(dimension_numbers) != ("N" + spec + "C", spec + "IO", "N" + spec + "C"):
            raise ValueError(
                f"Conv(dimension_numbers={dimension_numbers!r}) is not supported: kipnb.stax "
                f"uses channels-last inputs (NHWC) and HWIO filters; transpose the data."
            )
    return _single(_Conv(out_chan, filter_shape, strides, padding, W_std, b_std,
                         parameterization, s))


def AvgPool(window_shape: Sequence[int], strides: Sequence[int] | None = None,
            padding: str = "VALID", normalize_edges: bool = False, batch_axis: int = 0,
            channel_axis: int = -1):
    """Average pooling (``neural_tangents.stax.AvgPool``).

    ``strides=None`` means stride 1 (as in neural-tangents, not the window). With
    ``normalize_edges=False`` (the default) the window sum is divided by the window size
    also where ``'SAME'`` padding cuts the window; ``True`` divides by the pixels inside.
    The kernel averages the covariance over window pairs:
    ``K'(p, q) = mean over t, t' in the window of K(s p + t, s q + t')``.

    Args:
      window_shape: the window, e.g. ``(2, 2)``.
      strides: per spatial dimension; ``None`` means 1.
      padding: ``'SAME'`` or ``'VALID'``.
      normalize_edges: with ``'SAME'``, divide by the pixels inside the image.
      batch_axis: must be ``0``.
      channel_axis: must be ``-1``.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import jax, numpy as np
      >>> init_fn, apply_fn, _ = AvgPool((2, 2), strides=(2, 2))
      >>> apply_fn((), np.arange(16.0).reshape(1, 4, 4, 1))[0, :, :, 0].tolist()
      [[2.5, 4.5], [10.5, 12.5]]
    """
    _check_axes("AvgPool", batch_axis=batch_axis, channel_axis=channel_axis)
    return _single(_AvgPool(window_shape, strides, padding, normalize_edges))


def GlobalAvgPool(batch_axis: int = 0, channel_axis: int = -1):
    """Mean over all spatial positions: ``(N, H, W, C) -> (N, C)``.

    The kernel is the mean of the covariance over all pixel pairs ``(p, q)``.

    Args:
      batch_axis: must be ``0``.
      channel_axis: must be ``-1``.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> _, apply_fn, kernel_fn = serial(Conv(4, (2, 2)), Relu(), GlobalAvgPool(), Dense(1))
      >>> kernel_fn(np.ones((3, 4, 4, 2)), None, "nngp").shape
      (3, 3)
    """
    _check_axes("GlobalAvgPool", batch_axis=batch_axis, channel_axis=channel_axis)
    return _single(_GlobalAvgPool())


def Flatten(batch_axis: int = 0, batch_axis_out: int = 0):
    """``(N, ...) -> (N, prod(...))``; its kernel is the mean over pixels of ``K(p, p)``.

    Args:
      batch_axis: must be ``0``.
      batch_axis_out: must be ``0``.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> _, apply_fn, _ = Flatten()
      >>> apply_fn((), np.zeros((2, 3, 3, 4))).shape
      (2, 36)
    """
    _check_axes("Flatten", batch_axis=batch_axis, batch_axis_out=batch_axis_out)
    return _single(_Flatten())


def Identity():
    """The identity layer (kernels unchanged).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> _, apply_fn, _ = Identity()
      >>> apply_fn((), np.ones((2, 3))).shape
      (2, 3)
    """
    return _single(_Identity())


def ABRelu(a: float, b: float, do_stabilize: bool = False):
    r"""``a * min(x, 0) + b * max(x, 0)``; ``do_stabilize`` is accepted and has no effect.

    Its kernels are the arc-cosine ones: with the angle
    :math:`\theta = \arccos(k_{12} / \sqrt{k_{11} k_{22}})`,

    .. math::

        \mathcal{K}' = \frac{(a - b)^2}{2\pi} \big(\sqrt{k_{11} k_{22} - k_{12}^2}
            - \theta k_{12}\big) + \frac{a^2 + b^2}{2} k_{12}, \qquad
        \dot{\mathcal{K}} = \frac{a^2 + b^2}{2} - \frac{(a - b)^2}{2\pi} \theta.

    Args:
      a: slope for negative inputs.
      b: slope for positive inputs.
      do_stabilize: accepted for compatibility (the kernels are positively homogeneous).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> _, apply_fn, _ = ABRelu(-0.5, 2.0)
      >>> apply_fn((), np.array([[-2.0, 3.0]])).tolist()
      [[1.0, 6.0]]
    """
    del do_stabilize
    return _single(_ABRelu(a, b, f"ABRelu({a}, {b})"))


def Relu(do_stabilize: bool = False):
    r"""ReLU nonlinearity (arc-cosine kernel of degree 1; :func:`ABRelu` with a=0, b=1).

    .. math::

        \mathcal{K}' = \frac{\sqrt{k_{11} k_{22} - k_{12}^2} + (\pi - \theta) k_{12}}
            {2\pi}, \qquad \dot{\mathcal{K}} = \frac{\pi - \theta}{2\pi}.

    Args:
      do_stabilize: accepted for compatibility; no effect.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> _, _, kernel_fn = serial(Dense(1, W_std=2 ** 0.5), Relu(), Dense(1))
      >>> x = np.array([[1.0, 0.0], [0.0, 1.0]])  # orthogonal inputs
      >>> print(np.round(np.asarray(kernel_fn(x, None, "nngp")), 4))  # 1/2 and 1/(2 pi)
      [[0.5    0.1592]
       [0.1592 0.5   ]]
    """
    del do_stabilize
    return _single(_ABRelu(0.0, 1.0, "Relu"))


def LeakyRelu(alpha: float, do_stabilize: bool = False):
    """``alpha * min(x, 0) + max(x, 0)`` (:func:`ABRelu` with a=alpha, b=1).

    Args:
      alpha: slope for negative inputs.
      do_stabilize: accepted for compatibility; no effect.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> LeakyRelu(0.5)[1]((), np.array([[-1.0, 2.0]])).tolist()
      [[-0.5, 2.0]]
    """
    del do_stabilize
    return _single(_ABRelu(alpha, 1.0, f"LeakyRelu({alpha})"))


def Abs(do_stabilize: bool = False):
    """Absolute value nonlinearity (:func:`ABRelu` with a=-1, b=1).

    Args:
      do_stabilize: accepted for compatibility; no effect.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> Abs()[1]((), np.array([[-1.5, 2.0]])).tolist()
      [[1.5, 2.0]]
    """
    del do_stabilize
    return _single(_ABRelu(-1.0, 1.0, "Abs"))


def Erf(a: float = 1.0, b: float = 1.0, c: float = 0.0):
    r"""``a * erf(b * x) + c`` (``neural_tangents.stax.Erf``).

    With :math:`\tilde k = b^2 k`,

    .. math::

        \mathcal{K}' = \frac{2 a^2}{\pi} \arcsin \frac{2 \tilde k_{12}}
            {\sqrt{(1 + 2 \tilde k_{11})(1 + 2 \tilde k_{22})}} + c^2, \qquad
        \dot{\mathcal{K}} = \frac{4 a^2 b^2}{\pi}
            \big((1 + 2 \tilde k_{11})(1 + 2 \tilde k_{22}) - 4 \tilde k_{12}^2\big)^{-1/2}.

    Args:
      a: output scale.
      b: input scale.
      c: output shift.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> _, _, kernel_fn = serial(Dense(1), Erf(), Dense(1))
      >>> x = np.array([[1.0, 1.0], [1.0, -1.0]])
      >>> print(np.round(np.asarray(kernel_fn(x, None, "nngp")), 4))  # (2/pi) asin(2/3), 0
      [[0.4646 0.    ]
       [0.     0.4646]]
    """
    return _single(_Erf(a, b, c))


def Gelu(approximate: bool = False):
    r"""GELU nonlinearity ``x * Phi(x)`` (``neural_tangents.stax.Gelu``).

    Its kernels are closed-form (Tsuchida et al., 2020, "Avoiding kernel fixed points";
    the NTK as in neural-tangents): with :math:`P = k_{11} k_{22}`,
    :math:`P_1 = (1 + k_{11})(1 + k_{22})`, :math:`D = \sqrt{P_1 - k_{12}^2}` and
    :math:`\theta = \arctan(k_{12} / D)`,

    .. math::

        \mathcal{K}' = \frac{k_{12}}{4} + \frac{1}{2\pi}\Big(k_{12}\theta
            + \frac{k_{12}^2 + P D^2}{P_1 D}\Big), \qquad
        \dot{\mathcal{K}} = \frac14 + \frac{\theta}{2\pi}
            + \frac{k_{12}}{2\pi D}\Big(\frac{1}{D^2} + \frac{1 - P}{P_1} + 1\Big).

    Args:
      approximate: only for the finite network (``apply_fn``): use the ``tanh``
        approximation of :func:`jax.nn.gelu`. The kernels are those of the exact GELU.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> _, _, kernel_fn = serial(Dense(8), Gelu(), Dense(1))
      >>> x = np.array([[2.0, 0.0], [0.0, 2.0]])  # variance 2 each, orthogonal
      >>> print(np.round(np.asarray(kernel_fn(x, None, "nngp")), 4))
      [[0.9221 0.2122]
       [0.2122 0.9221]]
    """
    return _single(_Gelu(approximate))


def LayerNorm(axis=-1, eps: float = 1e-12, batch_axis: int = 0, channel_axis: int = -1):
    r"""Layer normalisation (``neural_tangents.stax.LayerNorm``).

    The finite layer computes ``(x - mean) / sqrt(eps + var)`` over ``axis``. Its
    infinite-width kernels normalise the covariance: for pixels ``p`` of ``x1`` and
    ``q`` of ``x2``,

    .. math::

        \mathcal{K}'(p, q) = \frac{\mathcal{K}(p, q)}
            {\sqrt{(\epsilon + \bar v_1(p)) (\epsilon + \bar v_2(q))}},

    with :math:`\bar v(p)` the variance :math:`\mathcal{K}(p, p)` averaged over the spatial
    axes in ``axis`` (``axis=-1``: per pixel; ``axis=(1, 2, 3)`` on NHWC images: over the
    whole image). The NTK is divided by the same factor. As in neural-tangents the input
    must be Gaussian (come from ``Dense``/``Conv``, possibly pooled), ``axis`` must include
    the channel axis, and the output stays Gaussian (a nonlinearity may follow).

    Args:
      axis: the axis or axes normalised over; must contain ``-1`` (channels) and not ``0``.
      eps: added to the variance (avoids division by zero).
      batch_axis: must be ``0`` (batch-first inputs).
      channel_axis: must be ``-1`` (channels-last inputs).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Example:
      >>> import numpy as np
      >>> _, _, kernel_fn = serial(Dense(8), LayerNorm(), Dense(1))
      >>> x = np.array([[3.0, 0.0], [1.0, 1.0]])
      >>> print(np.round(np.asarray(kernel_fn(x, None, "nngp")), 4))  # cosine similarity
      [[1.     0.7071]
       [0.7071 1.    ]]
    """
    _check_axes("LayerNorm", batch_axis=batch_axis, channel_axis=channel_axis)
    layer = _LayerNorm(axis, eps)
    return _single(layer)


# --------------------------------------------------------------------------- batching


def batch(kernel_fn: Callable, batch_size: int = 0, device_count: int = -1,
          store_on_device: bool = True) -> Callable:
    """Block-wise ``kernel_fn`` (``neural_tangents.batch``): bounded memory, same values.

    The returned ``blocked(x1, x2=None, *args, **kwargs)`` splits ``x1`` and ``x2`` into
    blocks of at most ``batch_size`` rows (the last block is padded by repeating the last
    row and the padding is dropped), evaluates ``kernel_fn(a, b, *args, **kwargs)`` on
    every pair of blocks with ``jax.lax.map`` (one compiled block, rematerialised under
    ``jax.grad``) and assembles every leaf of the result (an array, or a pytree such as
    the ``Kernel`` namedtuple) into its ``(N1, N2, ...)`` whole. ``x2=None`` computes
    ``x1`` against itself. The extra arguments go unchanged to every block: ``get`` for
    the kernels of :func:`serial`, the network's ``params`` for
    :func:`empirical_ntk_fn` and its siblings (``nt.batch(empirical_kernel_fn, 10)(x,
    None, params)``, as in Google Research's ``kip/nn_training.ipynb``). Unlike
    neural-tangents, ``N1`` and ``N2`` need not be multiples of ``batch_size``.
    ``batch_size=0`` returns ``kernel_fn`` unchanged (as in neural-tangents);
    ``device_count`` and ``store_on_device`` are accepted for compatibility and have no
    effect (the blocks run on JAX's default device).

    Args:
      kernel_fn: ``kernel_fn(x1, x2, *args, **kwargs)`` returning arrays (or a pytree of
        them) whose first two axes are ``x1``'s and ``x2``'s rows.
      batch_size: the most rows of ``x1`` and of ``x2`` per block; 0 for no blocks.
      device_count: accepted for compatibility; no effect.
      store_on_device: accepted for compatibility; no effect.

    Returns:
      ``blocked(x1, x2=None, *args, **kwargs)``, equal to ``kernel_fn``'s result.

    Example:
      >>> import numpy as np
      >>> _, _, kernel_fn = serial(Dense(8), Relu(), Dense(1))
      >>> x = np.linspace(-1.0, 1.0, 21, dtype=np.float32).reshape(7, 3)
      >>> k = batch(kernel_fn, batch_size=3)(x, None, "ntk")
      >>> k.shape, bool(np.allclose(k, kernel_fn(x, None, "ntk"), rtol=1e-6))
      ((7, 7), True)
    """
    del device_count, store_on_device
    batch_size = int(batch_size)
    if batch_size == 0:
        return kernel_fn
    if batch_size < 0:
        raise ValueError(f"batch_size={batch_size} must be a positive number of rows "
                         f"(or 0 for no batching).")

    def blocked(x1, x2=None, *args, **kwargs):
        x1 = jnp.asarray(x1)
        x2 = x1 if x2 is None else jnp.asarray(x2)
        n1, n2 = x1.shape[0], x2.shape[0]
        if n1 <= batch_size and n2 <= batch_size:
            return kernel_fn(x1, x2, *args, **kwargs)
        b1, b2 = min(batch_size, n1), min(batch_size, n2)

        def blocks(x, bs):
            nb = -(-x.shape[0] // bs)
            pad = nb * bs - x.shape[0]
            if pad:
                x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
            return x.reshape(nb, bs, *x.shape[1:])

        xb1, xb2 = blocks(x1, b1), blocks(x2, b2)

        @jax.checkpoint
        def one(a, b):
            return kernel_fn(a, b, *args, **kwargs)

        def row(a):
            return lax.map(lambda b: one(a, b), xb2)

        parts = lax.map(row, xb1)  # every leaf (nb1, nb2, b1, b2, ...)

        def assemble(p):
            if jnp.ndim(p) < 4 or p.shape[2:4] != (b1, b2):
                raise ValueError(
                    f"batch: kernel_fn returned a block of shape {jnp.shape(p)[2:]} for "
                    f"{b1} x {b2} inputs; every output must start with the two inputs' "
                    f"row axes (N1, N2, ...) to be assembled from blocks.")
            p = jnp.swapaxes(p, 1, 2)
            p = p.reshape(p.shape[0] * p.shape[1], p.shape[2] * p.shape[3], *p.shape[4:])
            return p[:n1, :n2]

        return jax.tree_util.tree_map(assemble, parts)

    return blocked


def max_learning_rate(ntk_train_train, y_train_size: int | None = None, momentum=0.0,
                      eps: float = 1e-12) -> float:
    r"""The largest stable learning rate of an MSE-trained network
    (``nt.predict.max_learning_rate``).

    For gradient descent on ``1 / (2 * y_train_size) * ||f(x) - y||**2`` the linearised
    network contracts while ``eta < 2 * y_train_size / lambda_max(NTK)``; with momentum
    ``m`` the bound is ``2 * (1 + m) * y_train_size / lambda_max`` (neural-tangents'
    formula):

    .. math:: \eta_{max} = rac{2 (1 + m)\, n_y}{\lambda_{max}(\Theta) + \epsilon}

    Args:
      ntk_train_train: the (analytic or empirical) NTK of the training set, ``(N, N)``,
        or ``(N, N, K, K)`` (``trace_axes=()``: flattened to ``(N*K, N*K)``).
      y_train_size: the number of training targets, ``y_train.size``; ``None`` takes the
        flattened kernel's size (right for ``trace_axes=()`` kernels).
      momentum: the momentum of the optimizer.
      eps: keeps the division finite for a zero kernel.

    Returns:
      The learning rate, a float. (neural-tangents 0.6.5's CPU branch fails on current
      SciPy, ``eigvalsh(..., eigvals=...)``; this one runs on every backend.)

    Example:
      >>> import numpy as np
      >>> round(max_learning_rate(np.diag([4.0, 1.0]), y_train_size=2), 9)  # 2 * 2 / 4
      1.0
    """
    k = np.asarray(ntk_train_train, dtype=np.float64)
    if k.ndim % 2 or k.ndim < 2 or k.shape[0::2] != k.shape[1::2]:
        raise ValueError(f"max_learning_rate: ntk_train_train has shape {k.shape}; expected "
                         f"a train-train kernel (N, N) or (N, N, K, K).")
    half = k.ndim // 2
    k = k.transpose(*range(0, k.ndim, 2), *range(1, k.ndim, 2))  # (N, K, N, K)
    k = k.reshape(math.prod(k.shape[:half]), -1)
    if not np.all(np.isfinite(k)):
        raise ValueError("max_learning_rate: ntk_train_train is not finite (NaN or inf); "
                         "check the network's parameters and inputs.")
    factor = k.shape[0] if y_train_size is None else int(y_train_size)
    lam = float(np.linalg.eigvalsh((k + k.T) / 2)[-1])
    return float(2 * (1 + momentum) * factor / (lam + eps))


class _Predict:
    """``stax.predict``: what ``nt.predict`` code needs here (``max_learning_rate``)."""

    max_learning_rate = staticmethod(max_learning_rate)

    def __repr__(self):
        return "<kipnb.stax.predict: max_learning_rate>"


#: ``nt.predict``'s namespace, so that ``nt.predict.max_learning_rate(...)`` ports to
#: ``stax.predict.max_learning_rate(...)`` (KRR predictions live in :mod:`kipnb.krr`).
predict = _Predict()


# --------------------------------------------------------------------------- empirical kernels
#
# Finite-network kernels with the API of neural_tangents.empirical_*_fn and
# neural_tangents.monte_carlo_kernel_fn (in neural-tangents these live at the package's top
# level, ``nt.empirical_ntk_fn``; kipnb keeps them in ``kipnb.stax``).

_NTK_IMPLEMENTATIONS = (0, 1, 2, 3)  # neural_tangents.NtkImplementation values


def _canonical_axes(axes, ndim: int, what: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    out = []
    for a in axes:
        if not -ndim <= int(a) < ndim:
            raise ValueError(f"{what}={axes} is out of range for {ndim}-D outputs f(x).")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{what}={axes} names an axis twice.")
    return tuple(sorted(out))


def _pair_subscripts(ndim: int, trace_axes, diagonal_axes):
    """einsum subscripts ``(a, b, out)`` for the kernel of two outputs of ``ndim`` axes.

    The layout is neural-tangents': for each output axis in order, a traced axis is
    summed (and absent), a diagonal axis appears once, any other axis twice (x1's, x2's).
    """
    trace = _canonical_axes(trace_axes, ndim, "trace_axes")
    diag = _canonical_axes(diagonal_axes, ndim, "diagonal_axes")
    if set(trace) & set(diag):
        raise ValueError(f"trace_axes={tuple(trace_axes)} and diagonal_axes="
                         f"{tuple(diagonal_axes)} share an axis; an axis is either traced "
                         f"or kept diagonal.")
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    a, b, out = [], [], []
    for i in range(ndim):
        la = next(letters)
        if i in trace or i in diag:
            a.append(la)
            b.append(la)
            if i in diag:
                out.append(la)
        else:
            lb = next(letters)
            a.append(la)
            b.append(lb)
            out += [la, lb]
    return "".join(a), "".join(b), "".join(out), trace, letters


def _trace_size(shape, trace) -> int:
    return math.prod(shape[i] for i in trace)


def _check_pair_shapes(f1, f2, trace, diag):
    if f1.ndim != f2.ndim or any(f1.shape[i] != f2.shape[i] for i in (*trace, *diag)):
        raise ValueError(
            f"f(x1) of shape {f1.shape} and f(x2) of shape {f2.shape} must have the same "
            f"number of axes and agree on trace_axes {trace} and diagonal_axes {diag}.")


def _split_kwargs(kwargs: dict, x1, x2):
    """neural-tangents' ``split_kwargs``: ``rng`` gets a second key for ``x2`` (the same
    key when ``x2`` is ``x1``), a pair ``(v1, v2)`` is split, anything else is shared."""
    k1, k2 = {}, {}
    for name, v in kwargs.items():
        if name == "rng" and x2 is not None and v is not None:
            k1[name] = v
            if x1 is x2:
                k2[name] = v
            elif jnp.shape(x1) != jnp.shape(x2):
                k2[name] = jax.random.fold_in(v, 1)
            else:  # traceable: the same key exactly when x2 equals x1
                same = jnp.all(jnp.asarray(x1) == jnp.asarray(x2))
                k2[name] = jnp.where(same, v, jax.random.fold_in(v, 1))
        elif isinstance(v, tuple) and len(v) == 2:
            k1[name], k2[name] = v
        else:
            k1[name] = k2[name] = v
    return k1, k2


def _check_ntk_options(vmap_axes, implementation):
    del vmap_axes  # a speed hint in neural-tangents; every value gives the same kernel here
    impl = int(implementation)
    if impl not in _NTK_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not a neural_tangents.NtkImplementation "
            f"(0 AUTO, 1 JACOBIAN_CONTRACTION, 2 NTK_VECTOR_PRODUCTS, 3 "
            f"STRUCTURED_DERIVATIVES). kipnb computes every one by Jacobian contraction.")


def empirical_nngp_fn(f: Callable, trace_axes=(-1,), diagonal_axes=()) -> Callable:
    r"""The NNGP of one finite network: output covariance (``nt.empirical_nngp_fn``).

    .. math:: \hat{\mathcal K}(x_1, x_2) = \frac{1}{|T|} \sum_{t \in T} f(x_1)_t f(x_2)_t

    summed over the ``trace_axes`` ``T`` (by default the logits/channels) and divided by
    their size, so the width-averaged output covariance converges to the infinite-width
    NNGP. The kernel's axes are neural-tangents': per output axis in order, a traced axis
    is absent, a ``diagonal_axes`` axis appears once, any other twice (``x1``'s, ``x2``'s),
    e.g. ``(N1, N2)`` for ``(N, C)`` outputs and ``trace_axes=(-1,)``. Outputs may be
    pytrees (each leaf gets its own kernel).

    Args:
      f: ``f(params, x, **kwargs)``, e.g. a stax ``apply_fn``.
      trace_axes: output axes summed over (divided by their size).
      diagonal_axes: output axes of which only the diagonal is kept.

    Returns:
      ``nngp_fn(x1, x2, params, **apply_fn_kwargs)``; ``x2=None`` means ``x2 = x1``.
      Keywords go to ``f`` as in neural-tangents (``rng`` is split for ``x2``, a pair
      ``(v1, v2)`` goes to ``x1`` and ``x2``).

    Example:
      >>> import jax, numpy as np
      >>> init_fn, apply_fn, _ = serial(Dense(2048, W_std=1.5), Relu(), Dense(2048))
      >>> _, params = init_fn(jax.random.PRNGKey(0), (2, 3))
      >>> x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> k = empirical_nngp_fn(apply_fn)(x, None, params)
      >>> k.shape
      (2, 2)
      >>> bool(np.allclose(k, serial(Dense(1, W_std=1.5), Relu(), Dense(1))[2](x, None, "nngp"),
      ...                  atol=0.05))
      True
    """

    def nngp_fn(x1, x2, params, **apply_fn_kwargs):
        kw1, kw2 = _split_kwargs(apply_fn_kwargs, x1, x2)
        out1 = f(params, x1, **kw1)
        out2 = out1 if x2 is None else f(params, x2, **kw2)

        def contract(a, b):
            sa, sb, so, trace, _ = _pair_subscripts(a.ndim, trace_axes, diagonal_axes)
            _check_pair_shapes(a, b, trace, _canonical_axes(diagonal_axes, a.ndim, "d"))
            dot = jnp.einsum(f"{sa},{sb}->{so}", a, b, precision=HIGHEST)
            return dot / _trace_size(a.shape, trace)

        return jax.tree_util.tree_map(contract, out1, out2)

    return nngp_fn


def empirical_ntk_fn(f: Callable, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None,
                     implementation=1, _j_rules: bool = True, _s_rules: bool = True,
                     _fwd=None) -> Callable:
    r"""The NTK of one finite network (``nt.empirical_ntk_fn``).

    .. math:: \hat\Theta(x_1, x_2) = \frac{1}{|T|} \sum_{t \in T} \sum_{\theta}
        \frac{\partial f(x_1)_t}{\partial\theta} \frac{\partial f(x_2)_t}{\partial\theta}

    over all parameter leaves ``theta``, with the axes and ``trace_axes`` /
    ``diagonal_axes`` of :func:`empirical_nngp_fn`. Computed by instantiating the
    Jacobians (neural-tangents' ``implementation=1``), which is memory-hungry for wide
    networks: batch the inputs (``batch``-style blocks) when ``N * outputs * params``
    is large.

    Args:
      f: ``f(params, x, **kwargs)``.
      trace_axes: output axes summed over (divided by their size).
      diagonal_axes: output axes of which only the diagonal is kept.
      vmap_axes: accepted for compatibility (a speed hint in neural-tangents).
      implementation: any ``neural_tangents.NtkImplementation`` value (0-3); all give the
        same kernel, computed here by Jacobian contraction.
      _j_rules: accepted for compatibility; no effect.
      _s_rules: accepted for compatibility; no effect.
      _fwd: accepted for compatibility; no effect.

    Returns:
      ``ntk_fn(x1, x2, params, **apply_fn_kwargs)``; ``x2=None`` means ``x2 = x1``.

    Example:
      >>> import jax, numpy as np
      >>> init_fn, apply_fn, kernel_fn = serial(Dense(2048), Relu(), Dense(1))
      >>> _, params = init_fn(jax.random.PRNGKey(0), (2, 3))
      >>> x = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
      >>> ntk = empirical_ntk_fn(apply_fn)(x, None, params)
      >>> bool(np.allclose(ntk, kernel_fn(x, None, "ntk"), atol=0.05))
      True
    """
    del _j_rules, _s_rules, _fwd
    _check_ntk_options(vmap_axes, implementation)

    def ntk_fn(x1, x2, params, **apply_fn_kwargs):
        kw1, kw2 = _split_kwargs(apply_fn_kwargs, x1, x2)

        def jac(x, kw):
            out = f(params, x, **kw)
            return out, jax.jacrev(lambda p: f(p, x, **kw))(params)

        out1, j1 = jac(x1, kw1)
        out2, j2 = (out1, j1) if x2 is None else jac(x2, kw2)

        def contract(o1, o2, ja, jb):
            sa, sb, so, trace, letters = _pair_subscripts(o1.ndim, trace_axes, diagonal_axes)
            _check_pair_shapes(o1, o2, trace, _canonical_axes(diagonal_axes, o1.ndim, "d"))
            p = next(letters)
            total = 0.0
            for la, lb in zip(jax.tree_util.tree_leaves(ja), jax.tree_util.tree_leaves(jb),
                              strict=True):
                la = la.reshape(*o1.shape, -1)
                lb = lb.reshape(*o2.shape, -1)
                total = total + jnp.einsum(f"{sa}{p},{sb}{p}->{so}", la, lb, precision=HIGHEST)
            return total / _trace_size(o1.shape, trace)

        # Jacobians are pytrees (output structure) of pytrees (params structure).
        outs1, tree = jax.tree_util.tree_flatten(out1)
        outs2 = jax.tree_util.tree_leaves(out2)
        if tree.num_leaves == 1:
            return contract(outs1[0], outs2[0], j1, j2)
        js1 = tree.flatten_up_to(j1)
        js2 = tree.flatten_up_to(j2)
        return tree.unflatten([contract(*a) for a in zip(outs1, outs2, js1, js2, strict=True)])

    return ntk_fn


def empirical_kernel_fn(f: Callable, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None,
                        implementation=1, _j_rules: bool = True, _s_rules: bool = True,
                        _fwd=None) -> Callable:
    """NNGP and/or NTK of one finite network (``nt.empirical_kernel_fn``).

    Args:
      f: ``f(params, x, **kwargs)``.
      trace_axes: output axes summed over (divided by their size).
      diagonal_axes: output axes of which only the diagonal is kept.
      vmap_axes: see :func:`empirical_ntk_fn`.
      implementation: see :func:`empirical_ntk_fn`.
      _j_rules: accepted for compatibility; no effect.
      _s_rules: accepted for compatibility; no effect.
      _fwd: accepted for compatibility; no effect.

    Returns:
      ``kernel_fn(x1, x2, get, params, **apply_fn_kwargs)``: ``get`` is ``'nngp'``,
      ``'ntk'`` (an array), a tuple of them (a namedtuple in that order) or ``None``
      (a namedtuple of both), as for the infinite-width ``kernel_fn``.

    Example:
      >>> import jax, numpy as np
      >>> init_fn, apply_fn, _ = serial(Dense(16), Relu(), Dense(3))
      >>> _, params = init_fn(jax.random.PRNGKey(0), (4, 5))
      >>> x = np.ones((4, 5))
      >>> k = empirical_kernel_fn(apply_fn)(x, None, None, params)
      >>> k.nngp.shape, k.ntk.shape
      ((4, 4), (4, 4))
      >>> empirical_kernel_fn(apply_fn, trace_axes=())(x, x[:2], "ntk", params).shape
      (4, 2, 3, 3)
    """
    fns = {"nngp": empirical_nngp_fn(f, trace_axes, diagonal_axes),
           "ntk": empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation)}

    def kernel_fn(x1, x2, get, params, **apply_fn_kwargs):
        fields, single = _canonical_get(get)
        out = [fns[g](x1, x2, params, **apply_fn_kwargs) for g in fields]
        if single:
            return out[0]
        return _kernel_type(fields)(*out)

    return kernel_fn


def monte_carlo_kernel_fn(init_fn: Callable, apply_fn: Callable, key, n_samples,
                          batch_size: int = 0, device_count: int = -1,
                          store_on_device: bool = True, trace_axes=(-1,), diagonal_axes=(),
                          vmap_axes=None, implementation=1, _j_rules: bool = True,
                          _s_rules: bool = True, _fwd=None) -> Callable:
    r"""Monte Carlo NNGP/NTK: the mean of empirical kernels of random finite networks
    (``nt.monte_carlo_kernel_fn``).

    Each sample draws fresh parameters with ``init_fn`` and computes
    :func:`empirical_kernel_fn`; the estimate is their average. For ``stax`` networks it
    converges to ``kernel_fn``'s exact kernels as the samples and the width grow: the
    NNGP's error falls like ``1 / sqrt(n_samples * width)`` (the readout's ``C`` outputs
    traced over count as ``C`` samples), plus an ``O(1 / width)`` bias for deep nets.
    The keys follow neural-tangents: ``key, k = split(key)`` per sample, then
    ``init_key, rng = split(k)``; ``apply_fn`` gets ``rng=`` (kipnb's layers ignore it).

    Args:
      init_fn: ``init_fn(key, input_shape) -> (output_shape, params)``.
      apply_fn: ``apply_fn(params, x, rng=..., **kwargs)``.
      key: a ``jax.random.PRNGKey``.
      n_samples: the number of networks, or an iterable of counts: then ``kernel_fn``
        returns a generator yielding the estimate after each count (sorted, ascending).
      batch_size: compute the kernel in blocks of at most this many rows of ``x1`` and
        ``x2`` (0: at once); unlike neural-tangents the sizes need not divide.
      device_count: accepted for compatibility; the blocks run on JAX's default device.
      store_on_device: accepted for compatibility; no effect.
      trace_axes: see :func:`empirical_nngp_fn`.
      diagonal_axes: see :func:`empirical_nngp_fn`; with ``batch_size`` it must not
        contain the batch axis 0.
      vmap_axes: see :func:`empirical_ntk_fn`.
      implementation: see :func:`empirical_ntk_fn`.
      _j_rules: accepted for compatibility; no effect.
      _s_rules: accepted for compatibility; no effect.
      _fwd: accepted for compatibility; no effect.

    Returns:
      ``kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)`` with the ``get`` forms of the
      infinite-width ``kernel_fn``.

    Example:
      >>> import jax, numpy as np
      >>> init_fn, apply_fn, kernel_fn = serial(Dense(512, W_std=1.5), Relu(), Dense(8))
      >>> mc = monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), 32)
      >>> x = np.array([[1.0, 0.0], [0.6, 0.8]])
      >>> bool(np.allclose(mc(x, None, "nngp"), kernel_fn(x, None, "nngp"), atol=0.05))
      True
    """
    del device_count, store_on_device, _j_rules, _s_rules, _fwd
    counts = _canonical_n_samples(n_samples)
    generator = not isinstance(n_samples, (int, np.integer))
    batch_size = int(batch_size)
    if batch_size < 0:
        raise ValueError(f"batch_size={batch_size} must be a positive number of rows "
                         f"(or 0 for no batching).")
    _check_ntk_options(vmap_axes, implementation)
    trace_axes = (trace_axes,) if isinstance(trace_axes, (int, np.integer)) else tuple(
        trace_axes)
    diagonal_axes = (diagonal_axes,) if isinstance(diagonal_axes, (int, np.integer)) else tuple(
        diagonal_axes)

    def one(x1, x2, k, fields, kwargs):
        return _mc_sample(x1, x2, k, kwargs, init_fn=init_fn, apply_fn=apply_fn,
                          fields=fields, trace_axes=trace_axes, diagonal_axes=diagonal_axes)

    def sample(x1, x2, k, fields, kwargs):
        if not batch_size or (x1.shape[0] <= batch_size
                              and (x2 is None or x2.shape[0] <= batch_size)):
            return one(x1, x2, k, fields, kwargs)
        if 0 in _canonical_axes(diagonal_axes, 2, "diagonal_axes"):
            raise ValueError("monte_carlo_kernel_fn(batch_size=...) cannot split the batch "
                             "axis when diagonal_axes contains 0; use batch_size=0.")
        xb = x1 if x2 is None else x2
        rows = []
        for i in range(0, x1.shape[0], batch_size):
            a = x1[i:i + batch_size]
            cols = [one(a, xb[j:j + batch_size], k, fields, kwargs)
                    for j in range(0, xb.shape[0], batch_size)]
            rows.append([jnp.concatenate(c, axis=1) for c in zip(*cols, strict=True)])
        return tuple(jnp.concatenate(r, axis=0) for r in zip(*rows, strict=True))

    def estimates(x1, x2, get, kwargs):
        fields, single = _canonical_get(get)
        x1 = jnp.asarray(x1)
        x2 = None if x2 is None else jnp.asarray(x2)
        total, k = None, key
        for n in range(1, counts[-1] + 1):
            k, sub = jax.random.split(k)
            s = sample(x1, x2, sub, fields, kwargs)
            total = s if total is None else tuple(a + b for a, b in zip(total, s, strict=True))
            if n in counts:
                mean = tuple(t / n for t in total)
                yield mean[0] if single else _kernel_type(fields)(*mean)

    def kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs):
        gen = estimates(x1, x2, get, apply_fn_kwargs)
        if generator:
            return gen
        return next(gen)

    return kernel_fn


@functools.partial(jax.jit, static_argnames=("init_fn", "apply_fn", "fields", "trace_axes",
                                             "diagonal_axes"))
def _mc_sample(x1, x2, k, kwargs, *, init_fn, apply_fn, fields, trace_axes, diagonal_axes):
    """One Monte Carlo sample; compiled once per network (``init_fn``/``apply_fn`` objects),
    options and shapes, so new keys (e.g. a fresh ``monte_carlo_kernel_fn`` per step, as
    random-feature KIP does) do not compile again."""
    init_key, rng = jax.random.split(k)
    _, params = init_fn(init_key, x1.shape)
    empirical = empirical_kernel_fn(apply_fn, trace_axes, diagonal_axes)
    return tuple(empirical(x1, x2, fields, params, rng=rng, **kwargs))


def _canonical_n_samples(n_samples) -> list[int]:
    if isinstance(n_samples, (int, np.integer)):
        values = [int(n_samples)]
    elif hasattr(n_samples, "__iter__") and not isinstance(n_samples, str):
        values = list(n_samples)
        if not all(isinstance(n, (int, np.integer)) for n in values):
            raise ValueError(f"n_samples={n_samples!r} must contain only integers.")
        values = [int(n) for n in values]
    else:
        raise TypeError(f"n_samples must be an integer or an iterable of integers, got "
                        f"{type(n_samples).__name__}.")
    if not values or any(n <= 0 for n in values):
        raise ValueError(f"n_samples={n_samples!r} must be positive integers.")
    return sorted(set(values))
