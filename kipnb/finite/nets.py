"""Finite networks for trajectory matching (MTT, DATM): functional, parameters as pytrees.

Trajectory matching (Cazenavette et al. 2022, "MTT"; Guo et al. 2024, "DATM") trains
*expert* networks on the real data, then unrolls a *student* network on the synthetic
images and compares the student's parameters with the expert's, as flat vectors. The
networks here are the ones those papers use, written as pure functions of a parameter
pytree (nested dicts of ``jnp`` arrays), so that ``jax.grad`` can flow through a whole
unrolled student run into the synthetic images.

Networks (frozen dataclasses: the configuration; ``init``/``apply``: the functions)
----------------------------------------------------------------------------------
* :class:`ConvNet` -- the "ConvNet-D" of DC/DSA/DM/MTT/DATM: ``depth`` blocks of

      Conv 3x3 (``width`` channels, stride 1, zero padding 1) -> norm -> ReLU
      -> AvgPool 2x2 stride 2

  then Flatten -> Dense(``num_classes``). Defaults as MTT's ``ConvNet``: width 128,
  depth 3, ``norm='instancenorm'``, ReLU, average pooling. ``'instancenorm'`` is what
  MTT builds as ``torch.nn.GroupNorm(width, width, affine=True)``: per sample and per
  channel, normalize over (H, W) with the biased variance and ``eps = 1e-5``, then a
  learnable per-channel scale (init 1) and bias (init 0). ``norm='none'`` drops it.
  ``norm='batchnorm'`` (FRePo's pool) normalizes with batch statistics while training and
  with running statistics otherwise; those statistics are a second pytree, the
  network's *state* (:meth:`ConvNet.init_state`, :meth:`ConvNet.apply_train`), so such
  a network is not a pure function of its parameters and the trainers that need one
  (trajectory matching, the evaluator) accept only :data:`STATELESS_NORMS`.
  ``norm_first=True`` puts the norm where FRePo's ``Conv`` has it: on the input of
  blocks 1, ..., depth - 1 (after the previous block's pooling), not after each conv.
  Pooling floors odd sizes (as ``torch.nn.AvgPool2d``). MTT pads the *first* conv by 3
  for 1-channel images (28x28 MNIST -> 32x32, so that ConvNet-3 ends at 4x4); here that
  is ``ConvNet(first_padding=3)``, default 1 (SAME).
* :class:`MLP` -- ``depth`` hidden Dense-ReLU layers of ``width`` units, then a Dense
  readout; MTT's MLP is ``MLP(width=128, depth=2)`` (the defaults).

Initialization (as PyTorch's defaults for ``nn.Conv2d`` / ``nn.Linear``): weights and
biases uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` with ``fan_in = in_channels *
3 * 3`` for convolutions and ``in_features`` for dense layers (torch's
``kaiming_uniform_(a=sqrt(5))`` works out to exactly this bound); norm scale 1, bias 0.
This is the *standard* parameterization (not the NTK one of ``kipnb.archs``), as the
trajectory-matching papers use, so their learning rates carry over.

Layout: images are NHWC ``(N, H, W, C)``; conv kernels HWIO ``(3, 3, C_in, C_out)``;
dense kernels ``(in, out)``. The flatten before the classifier is in (H, W, C) order
(torch flattens (C, H, W)): the parameter *count* is the same as MTT's, but importing a
torch state dict needs that permutation. ConvNet-3, width 128, 32x32x3 inputs, 10
classes: 320,010 parameters, as MTT's.

Parameter pytree of a ConvNet::

    {'block0': {'conv': {'w', 'b'}, 'norm': {'scale', 'bias'}}, ..., 'head': {'w', 'b'}}

(no ``'norm'`` entry with ``norm='none'``; with ``norm_first`` block 0 has none); the
state of a batch-norm ConvNet is ``{'block<d>': {'mean', 'var'}}`` for the blocks that
have a norm; of an MLP:
``{'dense0': {'w', 'b'}, ..., 'head': {'w', 'b'}}``.

Trajectory matching compares flat vectors: :func:`flatten_params` and
:func:`unflatten_params` convert (the order is ``jax.tree_util``'s, i.e. sorted dict
keys; it is the same for every pytree of one architecture). :func:`count_params`
counts. :func:`get` builds a network by name (``'convnet'``, ``'mlp'``, and MTT's
spellings ``'ConvNetD4'``, ``'ConvNetW64'``, ``'ConvNetNN'``).

Contractions use ``precision=jax.lax.Precision.HIGHEST`` (TPUs otherwise multiply
float32 in bfloat16).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kipnb.checks import is_int as _is_int

__all__ = [
    "NETS",
    "NORMS",
    "STATELESS_NORMS",
    "ConvNet",
    "MLP",
    "batch_moments",
    "batch_norm",
    "count_params",
    "flatten_params",
    "get",
    "unflatten_params",
]

#: The ConvNet's normalizations.
NORMS = ("instancenorm", "batchnorm", "none")
#: Those whose network is a pure function of its parameters (no running statistics).
STATELESS_NORMS = ("instancenorm", "none")
CONV_IMPLS = ("xla", "im2col", "patch_grad")
_THIN = 4  # patch_grad: convolutions with at most this many input channels
HIGHEST = jax.lax.Precision.HIGHEST
_EPS = 1e-5  # torch.nn.GroupNorm's default


def _check_positive_int(name: str, v, minimum: int = 1) -> None:
    if not (_is_int(v) and v >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}.")


def _torch_uniform(key, specs: list[tuple[tuple[int, ...], int]], dtype) -> list[jax.Array]:
    """One array per ``(shape, fan_in)`` in ``specs``, uniform in ``+-1/sqrt(fan_in)``.

    All values come from a single ``jax.random.uniform`` draw (split and reshaped), which
    compiles once per network instead of once per layer shape.
    """
    sizes = [math.prod(shape) for shape, _ in specs]
    u = jax.random.uniform(key, (sum(sizes),), dtype, minval=-1.0, maxval=1.0)
    out, start = [], 0
    for (shape, fan_in), size in zip(specs, sizes, strict=True):
        out.append(u[start:start + size].reshape(shape) / math.sqrt(fan_in))
        start += size
    return out


def _image_shape(input_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(
            f"input_shape must be (H, W, C) or (N, H, W, C) (NHWC images), got {input_shape!r}."
        )
    if min(shape) < 1:
        raise ValueError(f"input_shape must have positive sizes, got {input_shape!r}.")
    return shape  # type: ignore[return-value]


def instance_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = _EPS):
    """Per-sample, per-channel normalization over (H, W) of NHWC ``x``, then ``* scale + bias``.

    Equals ``torch.nn.GroupNorm(C, C, affine=True)`` (biased variance, ``eps`` inside
    the square root).
    """
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array,
               var: jax.Array, eps: float = _EPS) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` per channel (last axis) of NHWC ``x``.

    With the batch's statistics (:func:`batch_moments`) this is batch norm in training
    mode; with running statistics, in inference mode (flax's ``nn.BatchNorm``).

    Example:
        >>> x = jnp.arange(8.0).reshape(2, 2, 2, 1)
        >>> mean, var = batch_moments(x)
        >>> y = batch_norm(x, jnp.ones(1), jnp.zeros(1), mean, var)
        >>> bool(abs(y.mean()) < 1e-6), round(float(y.var()), 4)
        (True, 1.0)
    """
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance of NHWC ``x`` over (N, H, W)."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    return mean, jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))


def _avg_pool(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2, VALID (odd sizes floor, as torch.nn.AvgPool2d)."""
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return s / 4.0


def _xla_conv(x: jax.Array, w: jax.Array, p: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), [(p, p), (p, p)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST,
    )


def _patches(x: jax.Array, p: int) -> jax.Array:
    """(n, ho, wo, 9 c): ``[..., (3 i + j) * c + ch] = xpad[:, y + i, x + j, ch]`` (HWIO order)."""
    _, h, wd, _ = x.shape
    ho, wo = h + 2 * p - 2, wd + 2 * p - 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return jnp.concatenate(
        [xp[:, i:i + ho, j:j + wo, :] for i in range(3) for j in range(3)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _patch_grad_conv(x, w, p: int):
    """XLA's convolution whose kernel gradient is one matrix product of image patches.

    XLA:CPU computes the kernel gradient of a convolution with 1-3 input channels about
    ten times slower than this; the input gradient stays XLA's.
    """
    return _xla_conv(x, w, p)


def _patch_grad_fwd(x, w, p):
    return _xla_conv(x, w, p), (x, w)


def _patch_grad_bwd(p, res, g):
    x, w = res
    pt = _patches(x, p)
    dw = jnp.matmul(pt.reshape(-1, pt.shape[-1]).T, g.reshape(-1, g.shape[-1]).astype(x.dtype),
                    precision=HIGHEST)
    dx = jax.vjp(lambda xx: _xla_conv(xx, w, p), x)[1](g)[0]
    return dx, dw.reshape(w.shape).astype(w.dtype)


_patch_grad_conv.defvjp(_patch_grad_fwd, _patch_grad_bwd)


def _conv3x3(x: jax.Array, w: jax.Array, p: int, impl: str = "xla") -> jax.Array:
    """3x3 convolution, stride 1, zero padding ``p``, NHWC x HWIO -> NHWC."""
    if impl == "xla" or (impl == "patch_grad" and w.shape[2] > _THIN):
        return _xla_conv(x, w, p)
    if impl == "patch_grad":
        return _patch_grad_conv(x, w, p)
    pt = _patches(x, p)
    n, ho, wo, k = pt.shape
    out = jnp.matmul(pt.reshape(-1, k), w.reshape(k, -1), precision=HIGHEST)
    return out.reshape(n, ho, wo, w.shape[-1])


@dataclass(frozen=True)
class ConvNet:
    """MTT's ConvNet (see the module docstring): ``depth`` x [conv3x3 - norm - ReLU - avgpool2].

    Attributes:
      width: channels of every conv layer (MTT: 128).
      depth: number of conv blocks (MTT: 3).
      norm: ``'instancenorm'`` (MTT's default), ``'batchnorm'`` (running statistics in
        a separate state, see :meth:`init_state`) or ``'none'``.
      num_classes: outputs of the final Dense layer.
      first_padding: zero padding of the first conv (1 = SAME; MTT uses 3 for
        1-channel 28x28 images, turning them into 32x32 feature maps).
      width_growth: block ``d`` has ``width * width_growth**d`` channels (1: MTT's
        constant width; 2: FRePo's ``Conv``, 128 / 256 / 512 channels at depth 3).
      norm_first: normalize the input of blocks 1, ..., depth - 1 (FRePo's ``Conv``)
        instead of each conv's output (MTT's ConvNet, the default).
      bn_decay: batch norm's running statistics become ``bn_decay * old + (1 -
        bn_decay) * batch`` per training step (flax's ``momentum``; FRePo's ``Conv``:
        0.1, the default).

    Example:
        >>> net = ConvNet(width=4, depth=3, norm="none", first_padding=3, width_growth=2)
        >>> net.block_widths()
        (4, 8, 16)
        >>> net.feature_shape((28, 28, 1))
        (4, 4, 16)
        >>> bn = ConvNet(width=4, depth=3, norm="batchnorm", norm_first=True)
        >>> p, s = bn.init(jax.random.key(0), (8, 8, 1)), bn.init_state()
        >>> sorted(s), s["block1"]["mean"].shape   # blocks 1 and 2 normalize their input
        (['block1', 'block2'], (4,))
        >>> logits, s2 = bn.apply_train(p, s, jnp.ones((5, 8, 8, 1)))
        >>> bn.apply(p, jnp.ones((5, 8, 8, 1)), state=s2).shape
        (5, 10)
    """

    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    num_classes: int = 10
    first_padding: int = 1
    width_growth: int = 1
    norm_first: bool = False
    bn_decay: float = 0.1

    def __post_init__(self):
        _check_positive_int("width", self.width)
        _check_positive_int("depth", self.depth)
        _check_positive_int("num_classes", self.num_classes)
        _check_positive_int("first_padding", self.first_padding, minimum=0)
        _check_positive_int("width_growth", self.width_growth)
        if self.norm not in NORMS:
            raise ValueError(f"Unknown norm {self.norm!r}: use one of {list(NORMS)}.")
        if not isinstance(self.norm_first, bool):
            raise ValueError(f"norm_first must be True or False, got {self.norm_first!r}.")
        if not (isinstance(self.bn_decay, (int, float)) and 0 <= self.bn_decay < 1):
            raise ValueError(f"bn_decay must be a number in [0, 1), got {self.bn_decay!r}.")

    def norm_widths(self) -> dict[int, int]:
        """``{block: channels}`` of the blocks that have a norm layer (empty for 'none')."""
        if self.norm == "none":
            return {}
        widths = self.block_widths()
        if self.norm_first:
            return {d: widths[d - 1] for d in range(1, self.depth)}
        return dict(enumerate(widths))

    def init_state(self, dtype=jnp.float32) -> dict:
        """The running statistics of batch norm: mean 0, variance 1 (``{}`` for other norms).

        Returns:
            ``{'block<d>': {'mean': (C,), 'var': (C,)}}`` for each block with a norm.
        """
        if self.norm != "batchnorm":
            return {}
        return {f"block{d}": {"mean": jnp.zeros((c,), dtype), "var": jnp.ones((c,), dtype)}
                for d, c in self.norm_widths().items()}

    def block_widths(self) -> tuple[int, ...]:
        """The channels of each conv block: ``width * width_growth**d`` for block ``d``."""
        return tuple(self.width * self.width_growth**d for d in range(self.depth))

    def feature_shape(self, input_shape) -> tuple[int, int, int]:
        """(H, W, C) of the features entering the classifier, for images of ``input_shape``.

        Raises ValueError when the image is too small for ``depth`` poolings, naming the
        largest depth that fits.
        """
        h, w, _ = _image_shape(input_shape)
        h0, w0 = h + 2 * self.first_padding - 2, w + 2 * self.first_padding - 2
        if h0 < 1 or w0 < 1:
            raise ValueError(
                f"Images of {h}x{w} are too small for a 3x3 conv with padding "
                f"{self.first_padding}."
            )
        fits = min(h0.bit_length(), w0.bit_length()) - 1  # largest d with size >> d >= 1
        if self.depth > fits:
            raise ValueError(
                f"Images of {h}x{w} are too small for a ConvNet of depth {self.depth}: each "
                f"block halves the size ({h0}x{w0} after the first conv) and it would pool "
                f"to {h0 >> self.depth}x{w0 >> self.depth}. "
                + (f"Use depth <= {fits}." if fits else "Use larger images.")
            )
        return h0 >> self.depth, w0 >> self.depth, self.block_widths()[-1]

    def init(self, key: jax.Array, input_shape, dtype=jnp.float32) -> dict:
        """Parameters for images of ``input_shape`` ((H, W, C) or (N, H, W, C)), torch-style."""
        _, _, c = _image_shape(input_shape)
        fh, fw, fc = self.feature_shape(input_shape)
        specs, c_in = [], c
        for c_out in self.block_widths():
            specs += [((3, 3, c_in, c_out), c_in * 9), ((c_out,), c_in * 9)]
            c_in = c_out
        n_feat = fh * fw * fc
        specs += [((n_feat, self.num_classes), n_feat), ((self.num_classes,), n_feat)]
        arrays = _torch_uniform(key, specs, dtype)
        params: dict[str, Any] = {}
        norm_widths = self.norm_widths()
        for d in range(self.depth):
            block: dict[str, Any] = {"conv": {"w": arrays[2 * d], "b": arrays[2 * d + 1]}}
            if d in norm_widths:
                block["norm"] = {
                    "scale": jnp.ones((norm_widths[d],), dtype),
                    "bias": jnp.zeros((norm_widths[d],), dtype),
                }
            params[f"block{d}"] = block
        params["head"] = {"w": arrays[-2], "b": arrays[-1]}
        return params

    def apply(self, params: dict, x: jax.Array, *, conv: str = "xla",
              state: dict | None = None) -> jax.Array:
        """Logits ``(N, num_classes)`` for NHWC images ``x`` of shape ``(N, H, W, C)``.

        ``state``: the running statistics of a ``'batchnorm'`` network (required for
        it; :meth:`init_state`, :meth:`apply_train`), which normalize in inference mode.

        ``apply(params, x) == features(params, x) @ params['head']['w'] + params['head']['b']``.

        ``conv`` picks how the 3x3 convolutions are computed; all three are the same
        function (equal up to float rounding), they differ in speed on CPU:
        ``'xla'``: ``lax.conv_general_dilated``. ``'im2col'``: one matrix product of image
        patches with the kernel, so first and second derivatives are plain matrix
        products, which XLA:CPU runs 2-3x faster than its convolution gradients
        (trajectory matching differentiates through training steps, see
        :mod:`kipnb.tm`). ``'patch_grad'``: XLA's convolution, except that the kernel
        gradient of a convolution with at most 4 input channels (the first layer on
        images) is a patch matrix product: the fastest for plain training on CPU (a
        width-32 ConvNet step on 256 Fashion-MNIST images: 185 ms vs 430 ms 'xla' and
        230 ms 'im2col').
        """
        if conv not in CONV_IMPLS:
            raise ValueError(f"Unknown conv {conv!r}: use one of {list(CONV_IMPLS)}.")
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(
                f"ConvNet expects NHWC images of shape (N, H, W, C), got shape {x.shape} "
                f"({x.ndim}-D). Add a batch axis (x[None]) or a channel axis (x[..., None])."
            )
        c_params = params["block0"]["conv"]["w"].shape[2]
        if x.shape[-1] != c_params:
            raise ValueError(
                f"Channel mismatch: the images have {x.shape[-1]} channels (last axis of NHWC) "
                f"but the parameters were initialized for {c_params}. Are the images NCHW?"
            )
        x = self.features(params, x, conv=conv, state=state)
        return jnp.matmul(x, params["head"]["w"], precision=HIGHEST) + params["head"]["b"]

    def apply_train(self, params: dict, state: dict, x: jax.Array, *,
                    conv: str = "xla") -> tuple[jax.Array, dict]:
        """Training mode: ``(logits, new_state)``, batch norm with the batch's statistics.

        The new running statistics are ``bn_decay * old + (1 - bn_decay) * batch``
        (biased variance, as flax). For the other norms this is ``(apply(params, x),
        state)``.
        """
        f, new_state = self.features_train(params, state, x, conv=conv)
        return (jnp.matmul(f, params["head"]["w"], precision=HIGHEST) + params["head"]["b"],
                new_state)

    def features_train(self, params: dict, state: dict, x: jax.Array, *,
                       conv: str = "xla") -> tuple[jax.Array, dict]:
        """:meth:`features` in training mode: ``(features, new_state)``.

        See :meth:`apply_train`.
        """
        return self._forward(params, x, conv, state, train=True)

    def features(self, params: dict, x: jax.Array, *, conv: str = "xla",
                 state: dict | None = None) -> jax.Array:
        """The flattened features ``(N, H' * W' * C')`` entering the classifier.

        ``C'`` is the last block's channels (``block_widths()[-1]``).

        The last conv block's output, flattened in (H, W, C) order: what RFAD's random
        ConvNets and FRePo's model pool regress on (:mod:`kipnb.rfad`, :mod:`kipnb.frepo`).
        ``params['head']`` is not used (it may be absent). ``conv`` and ``state`` as in
        :meth:`apply`.

        Example:
            >>> net = ConvNet(width=8, depth=2, norm="none")
            >>> p = net.init(jax.random.key(0), (8, 8, 1))
            >>> net.features(p, jnp.ones((3, 8, 8, 1))).shape
            (3, 32)
        """
        return self._forward(params, x, conv, state, train=False)[0]

    def _forward(self, params, x, conv, state, train):
        if conv not in CONV_IMPLS:
            raise ValueError(f"Unknown conv {conv!r}: use one of {list(CONV_IMPLS)}.")
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(
                f"ConvNet expects NHWC images of shape (N, H, W, C), got shape {x.shape} "
                f"({x.ndim}-D). Add a batch axis (x[None]) or a channel axis (x[..., None])."
            )
        fh, fw, fc = self.feature_shape(x.shape)
        n_feat = params["head"]["w"].shape[0] if "head" in params else fh * fw * fc
        if fh * fw * fc != n_feat:
            raise ValueError(
                f"Images of {x.shape[1]}x{x.shape[2]} give {fh}x{fw}x{fc} = {fh * fw * fc} "
                f"features but the classifier was initialized for {n_feat}: initialize the "
                f"parameters with this image size."
            )
        if self.norm == "batchnorm" and state is None:
            raise ValueError(
                "ConvNet(norm='batchnorm') needs its running statistics: pass "
                "state=net.init_state() (or the state apply_train returned), or train with "
                "apply_train(params, state, x).")
        norm_widths, new_state = self.norm_widths(), {}

        def norm(x, d):
            scale, bias = params[f"block{d}"]["norm"]["scale"], params[f"block{d}"]["norm"]["bias"]
            if self.norm == "instancenorm":
                return instance_norm(x, scale, bias)
            old = state[f"block{d}"]
            if not train:
                return batch_norm(x, scale, bias, old["mean"], old["var"])
            mean, var = batch_moments(x)
            k = self.bn_decay
            new_state[f"block{d}"] = {
                "mean": k * old["mean"] + (1 - k) * jax.lax.stop_gradient(mean),
                "var": k * old["var"] + (1 - k) * jax.lax.stop_gradient(var)}
            return batch_norm(x, scale, bias, mean, var)

        for d in range(self.depth):
            block = params[f"block{d}"]
            if self.norm_first and d in norm_widths:
                x = norm(x, d)
            p = self.first_padding if d == 0 else 1
            x = _conv3x3(x, block["conv"]["w"].astype(x.dtype), p, conv) + block["conv"]["b"]
            if not self.norm_first and d in norm_widths:
                x = norm(x, d)
            x = _avg_pool(jax.nn.relu(x))
        if not train or self.norm != "batchnorm":
            new_state = state if state is not None else {}
        return x.reshape(x.shape[0], -1), new_state


@dataclass(frozen=True)
class MLP:
    """``depth`` hidden Dense-ReLU layers of ``width`` units, then Dense(num_classes).

    MTT's MLP is the default (two hidden layers of 128). Inputs are flattened per sample.
    """

    width: int = 128
    depth: int = 2
    num_classes: int = 10

    def __post_init__(self):
        _check_positive_int("width", self.width)
        _check_positive_int("depth", self.depth, minimum=0)
        _check_positive_int("num_classes", self.num_classes)

    def init(self, key: jax.Array, input_shape, dtype=jnp.float32) -> dict:
        """Parameters for inputs of ``input_shape`` ((H, W, C), (N, H, W, C) or (D,))."""
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 4:
            shape = shape[1:]
        n_in = math.prod(shape)
        dims = [n_in] + [self.width] * self.depth + [self.num_classes]
        specs = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            specs += [((a, b), a), ((b,), a)]
        arrays = _torch_uniform(key, specs, dtype)
        names = [f"dense{d}" for d in range(self.depth)] + ["head"]
        return {nm: {"w": arrays[2 * i], "b": arrays[2 * i + 1]} for i, nm in enumerate(names)}

    def apply(self, params: dict, x: jax.Array) -> jax.Array:
        """Logits ``(N, num_classes)`` for a batch ``x`` of shape ``(N, ...)``."""
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"MLP expects a batch (N, ...), got shape {x.shape}.")
        x = x.reshape(x.shape[0], -1)
        first = params["dense0" if self.depth else "head"]["w"].shape[0]
        if x.shape[1] != first:
            raise ValueError(
                f"Input mismatch: each sample has {x.shape[1]} features but the parameters "
                f"were initialized for {first}."
            )
        for d in range(self.depth):
            p = params[f"dense{d}"]
            x = jax.nn.relu(jnp.matmul(x, p["w"], precision=HIGHEST) + p["b"])
        return jnp.matmul(x, params["head"]["w"], precision=HIGHEST) + params["head"]["b"]


NETS = {"convnet": ConvNet, "mlp": MLP}


def get(name: str, **kw):
    """A network by name: ``'convnet'`` / ``'mlp'`` (case-insensitive) with keyword overrides.

    MTT's names also work: ``'ConvNetD4'`` (depth 4), ``'ConvNetW64'`` (width 64),
    ``'ConvNetNN'`` (no normalization), ``'ConvNetIN'`` (instance norm).
    """
    key = str(name).lower()
    if key in NETS:
        return NETS[key](**kw)
    m = re.fullmatch(r"convnet(?:d(\d+)|w(\d+)|(nn|in))", key)
    if m:
        d, w, n = m.groups()
        extra = {"depth": int(d)} if d else {"width": int(w)} if w else {
            "norm": "none" if n == "nn" else "instancenorm"}
        return ConvNet(**{**extra, **kw})
    raise ValueError(
        f"Unknown network {name!r}: use one of {sorted(NETS)} "
        f"(or MTT's 'ConvNetD<depth>', 'ConvNetW<width>', 'ConvNetNN', 'ConvNetIN')."
    )


def flatten_params(params) -> jax.Array:
    """All parameters as one 1-D vector (``jax.tree_util`` leaf order); jit-friendly."""
    return ravel_pytree(params)[0]


def unflatten_params(vec: jax.Array, template):
    """Inverse of :func:`flatten_params`: ``vec`` reshaped into a pytree like ``template``."""
    flat, unravel = ravel_pytree(template)
    vec = jnp.asarray(vec)
    if vec.shape != flat.shape:
        raise ValueError(
            f"The vector has shape {vec.shape} but the template has {flat.shape[0]} "
            f"parameters: expected shape {flat.shape}."
        )
    return unravel(vec)


def count_params(params) -> int:
    """The number of scalar parameters in a pytree."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
