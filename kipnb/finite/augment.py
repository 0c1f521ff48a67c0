"""Differentiable Siamese Augmentation (DSA), as MTT and DATM use it, in JAX.

Zhao & Bilen (2021) showed that distilled images improve when the network sees them
*augmented*, with augmentations that are differentiable in the images (so gradients
reach the synthetic pixels) and, when real and synthetic batches are compared, the
*same* random transformation on both ("siamese"). MTT (Cazenavette et al. 2022) and
DATM (Guo et al. 2024) train their experts and unroll their students with MTT's
``DiffAugment(x, 'color_crop_cutout_flip_scale_rotate', param=ParamDiffAug())``.
:func:`augment` reproduces it:

    augment(key, x, strategy='color_crop_cutout_flip_scale_rotate', params=DSAParams())

Semantics (checked against MTT's ``utils.py``)
---------------------------------------------
* ``strategy`` names groups joined by ``_``: ``color`` (brightness, then saturation, then
  contrast), ``crop`` (translation), ``cutout``, ``flip``, ``scale``, ``rotate``.
  ``'none'`` (or ``''``) returns ``x`` unchanged.
* ``DSAParams.aug_mode='S'`` (MTT's default, "single"): **one** group, drawn uniformly
  from the strategy, is applied per call -- the same group for the whole batch (MTT
  draws one ``torch.randint``). ``aug_mode='M'`` ("multiple", the original DSA/DiffAug
  behaviour) applies every group in the listed order.
* Random draws, per sample, uniform ``u ~ U[0, 1)`` unless stated (MTT's defaults):

  ==============  ======================================================  ============
  transform       effect                                                   default
  ==============  ======================================================  ============
  brightness      ``x + (u - 0.5) * brightness``                           1.0
  saturation      ``(x - m_c) * (u * saturation) + m_c``, m_c channel mean  2.0
  contrast        ``(x - m) * (u + contrast) + m``, m image mean            0.5
  crop            integer shift by ``t ~ U{-s..s}`` in x and y, s =         0.125
                  ``int(size * ratio_crop_pad + 0.5)``, zero fill
  cutout          zero a ``k x k`` square, k = ``int(size*ratio_cutout+.5)``, 0.5
                  centred at a uniform pixel (clipped at the border)
  flip            mirror left-right when ``u < prob_flip``                  0.5
  scale           sample at ``(sx * x, sy * y)``, sx, sy ~                  1.2
                  ``U[1/ratio_scale, ratio_scale]`` independently
                  (> 1 zooms out)
  rotate          rotate by ``(u - 0.5) * 2 * ratio_rotate`` degrees        15.0
  ==============  ======================================================  ============

  ``scale`` and ``rotate`` build an affine grid in normalized coordinates with
  ``align_corners=True`` and sample it bilinearly with zero padding, exactly like
  ``F.affine_grid`` + ``F.grid_sample`` in MTT. Note MTT's ``ratio_scale`` is 1.2 (a
  factor range [1/1.2, 1.2]), so ``ratio_scale=1`` -- not 0 -- is the identity.
* ``DSAParams.batchmode``: False (MTT's ``seed=-1``, what MTT's distillation and
  expert training use): every sample gets its own draw. True (DSA's seeded calls): one
  draw shared by the whole batch, so a real and a synthetic batch of *any* sizes get the
  identical transformation from the same key -- the siamese use. In either mode the same
  key gives the same output (JAX keys replace MTT's ``set_seed_DiffAug``); with
  ``batchmode=False`` per-sample draws for batches of different sizes are unrelated.

Images are NHWC ``(N, H, W, C)`` (MTT: NCHW; "x"/width is our axis 2). ``strategy`` and
``params`` are static (plain strings and a frozen, hashable dataclass): ``augment`` is
``jax.jit``-compiled with them as ``static_argnames``; the group choice of
``aug_mode='S'`` is a ``lax.switch`` on a traced index, so no Python control flow
depends on random values. Every transform is differentiable w.r.t. ``x`` (gathers and
bilinear weights; the random parameters carry no gradient).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

__all__ = ["AUGMENT_FNS", "DSAParams", "augment", "DEFAULT_STRATEGY", "strategy_groups"]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
AUG_MODES = ("S", "M")


@dataclass(frozen=True)
class DSAParams:
    """MTT's ``ParamDiffAug`` defaults (see the module docstring), plus ``batchmode``.

    Attributes:
      aug_mode: ``'S'`` one random group per call (MTT's default) or ``'M'`` all groups.
      prob_flip: probability of a left-right flip.
      ratio_scale: scale factors in ``[1/ratio_scale, ratio_scale]`` (>= 1; 1: identity).
      ratio_rotate: maximum rotation in degrees.
      ratio_crop_pad: maximum translation as a fraction of the image size.
      ratio_cutout: side of the cut-out square as a fraction of the image size.
      brightness: range of the additive brightness shift ``(u - 0.5) * brightness``.
      saturation: saturation factor ``u * saturation``.
      contrast: contrast factor ``u + contrast``.
      batchmode: one draw for the whole batch (siamese use) instead of one per sample.
    """

    aug_mode: str = "S"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    batchmode: bool = False

    def __post_init__(self):
        if self.aug_mode not in AUG_MODES:
            raise ValueError(
                f"Unknown aug_mode {self.aug_mode!r}: use 'S' (one random group per call) "
                f"or 'M' (all groups in order)."
            )
        if not isinstance(self.batchmode, bool):
            raise ValueError(f"batchmode must be True or False, got {self.batchmode!r}.")
        for name in ("prob_flip", "ratio_rotate", "ratio_crop_pad", "ratio_cutout",
                     "brightness", "saturation", "contrast"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and not isinstance(v, bool)
                    and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}.")
        if not (isinstance(self.ratio_scale, int | float) and math.isfinite(self.ratio_scale)
                and self.ratio_scale >= 1):
            raise ValueError(
                f"ratio_scale must be >= 1 (factors in [1/ratio, ratio]; 1 is the identity), "
                f"got {self.ratio_scale!r}."
            )


# ---------------------------------------------------------------------------- draws


def _uniform(key, n: int, p: DSAParams, dtype=jnp.float32) -> jax.Array:
    """(n,) uniform draws on [0, 1); one draw broadcast to all n when ``batchmode``."""
    u = jax.random.uniform(key, (1 if p.batchmode else n,), dtype)
    return jnp.broadcast_to(u, (n,))


def _randint(key, n: int, lo: int, hi: int, p: DSAParams) -> jax.Array:
    """(n,) integers in [lo, hi); one draw broadcast to all n when ``batchmode``."""
    r = jax.random.randint(key, (1 if p.batchmode else n,), lo, hi)
    return jnp.broadcast_to(r, (n,))


# ---------------------------------------------------------------------- transforms


def _brightness(key, x, p):
    u = _uniform(key, x.shape[0], p, x.dtype)[:, None, None, None]
    return x + (u - 0.5) * p.brightness


def _saturation(key, x, p):
    m = jnp.mean(x, axis=-1, keepdims=True)
    u = _uniform(key, x.shape[0], p, x.dtype)[:, None, None, None]
    return (x - m) * (u * p.saturation) + m


def _contrast(key, x, p):
    m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    u = _uniform(key, x.shape[0], p, x.dtype)[:, None, None, None]
    return (x - m) * (u + p.contrast) + m


def _crop(key, x, p):
    """Translate by whole pixels, zero fill (MTT's pad-and-crop)."""
    n, h, w, _ = x.shape
    sh, sw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    kh, kw = jax.random.split(key)
    th = _randint(kh, n, -sh, sh + 1, p)
    tw = _randint(kw, n, -sw, sw + 1, p)
    rows = jnp.arange(h)[None, :] + th[:, None]  # (n, h): source row of each output row
    cols = jnp.arange(w)[None, :] + tw[:, None]
    out = jnp.take_along_axis(x, jnp.clip(rows, 0, h - 1)[:, :, None, None], axis=1)
    out = jnp.take_along_axis(out, jnp.clip(cols, 0, w - 1)[:, None, :, None], axis=2)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    return out * valid[..., None].astype(x.dtype)


def _cutout(key, x, p):
    n, h, w, _ = x.shape
    kh, kw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    k1, k2 = jax.random.split(key)
    oh = _randint(k1, n, 0, h + (1 - kh % 2), p) - kh // 2  # first cut row
    ow = _randint(k2, n, 0, w + (1 - kw % 2), p) - kw // 2
    r = jnp.arange(h)[None, :]
    c = jnp.arange(w)[None, :]
    in_r = (r >= oh[:, None]) & (r < oh[:, None] + kh)
    in_c = (c >= ow[:, None]) & (c < ow[:, None] + kw)
    mask = 1.0 - (in_r[:, :, None] & in_c[:, None, :]).astype(x.dtype)
    return x * mask[..., None]


def _flip(key, x, p):
    u = _uniform(key, x.shape[0], p)[:, None, None, None]
    return jnp.where(u < p.prob_flip, x[:, :, ::-1, :], x)


def _affine(x, theta):
    """``grid_sample(x, affine_grid(theta), align_corners=True)`` for NHWC ``x``.

    ``theta``: (n, 2, 3) maps normalized output coordinates (x = width, y = height, in
    [-1, 1], -1/1 at the centres of the corner pixels) to input coordinates. Bilinear,
    zero padding outside the image.
    """
    n, h, w, c = x.shape
    yn = -1.0 + 2.0 * jnp.arange(h, dtype=x.dtype) / max(h - 1, 1)
    xn = -1.0 + 2.0 * jnp.arange(w, dtype=x.dtype) / max(w - 1, 1)
    gy, gx = jnp.meshgrid(yn, xn, indexing="ij")  # (h, w)
    theta = theta.astype(x.dtype)
    t = theta[:, :, :, None, None]  # (n, 2, 3, 1, 1)
    sx = t[:, 0, 0] * gx + t[:, 0, 1] * gy + t[:, 0, 2]  # (n, h, w), normalized source
    sy = t[:, 1, 0] * gx + t[:, 1, 1] * gy + t[:, 1, 2]
    col = (sx + 1.0) * 0.5 * (w - 1)  # (n, h, w) source pixel coordinates
    row = (sy + 1.0) * 0.5 * (h - 1)
    col, row = jax.lax.stop_gradient(col), jax.lax.stop_gradient(row)
    r0, c0 = jnp.floor(row), jnp.floor(col)
    fr, fc = row - r0, col - c0
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
    flat = x.reshape(n, h * w, c)
    out = jnp.zeros_like(x)
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            idx = (jnp.clip(rr, 0, h - 1) * w + jnp.clip(cc, 0, w - 1)).reshape(n, h * w, 1)
            vals = jnp.take_along_axis(flat, idx, axis=1).reshape(n, h, w, c)
            out = out + vals * (wr * wc * ok.astype(x.dtype))[..., None]
    return out


def _scale(key, x, p):
    n = x.shape[0]
    k1, k2 = jax.random.split(key)
    lo = 1.0 / p.ratio_scale
    sx = _uniform(k1, n, p) * (p.ratio_scale - lo) + lo
    sy = _uniform(k2, n, p) * (p.ratio_scale - lo) + lo
    zero = jnp.zeros_like(sx)
    theta = jnp.stack([jnp.stack([sx, zero, zero], -1), jnp.stack([zero, sy, zero], -1)], 1)
    return _affine(x, theta)


def _rotate(key, x, p):
    n = x.shape[0]
    t = (_uniform(key, n, p) - 0.5) * 2.0 * p.ratio_rotate / 180.0 * math.pi
    cos, sin, zero = jnp.cos(t), jnp.sin(t), jnp.zeros_like(t)
    theta = jnp.stack([jnp.stack([cos, -sin, zero], -1), jnp.stack([sin, cos, zero], -1)], 1)
    return _affine(x, theta)


#: The transforms of each strategy group, applied in this order (as MTT's AUGMENT_FNS).
AUGMENT_FNS = {
    "color": (_brightness, _saturation, _contrast),
    "crop": (_crop,),
    "cutout": (_cutout,),
    "flip": (_flip,),
    "scale": (_scale,),
    "rotate": (_rotate,),
}


def _apply_group(group: str, key, x, p: DSAParams):
    fns = AUGMENT_FNS[group]
    for k, f in zip(jax.random.split(key, len(fns)), fns, strict=True):
        x = f(k, x, p)
    return x


def strategy_groups(strategy: str) -> list[str]:
    """The augmentation groups of a DSA strategy string; an unknown group is an error.

    Args:
      strategy: groups joined by ``'_'`` (MTT's ``'color_crop_cutout_flip_scale_rotate'``),
        or ``'none'`` / ``''`` for no augmentation.

    Returns:
      The list of group names, empty for no augmentation.

    Raises:
      ValueError: ``strategy`` is not a string or names a group not in ``AUGMENT_FNS``.

    Example:
      >>> strategy_groups("crop_flip")
      ['crop', 'flip']
      >>> strategy_groups("none")
      []
    """
    if not isinstance(strategy, str):
        raise ValueError(f"strategy must be a string such as {DEFAULT_STRATEGY!r}.")
    if strategy in ("", "none", "None"):
        return []
    groups = strategy.split("_")
    unknown = [g for g in groups if g not in AUGMENT_FNS]
    if unknown:
        raise ValueError(
            f"Unknown augmentation(s) {unknown} in strategy {strategy!r}: use groups from "
            f"{list(AUGMENT_FNS)} joined by '_' (e.g. {DEFAULT_STRATEGY!r}), or 'none'."
        )
    return groups


@functools.partial(jax.jit, static_argnames=("strategy", "params"))
def augment(
    key: jax.Array,
    x: jax.Array,
    strategy: str = DEFAULT_STRATEGY,
    params: DSAParams = DSAParams(),  # noqa: B008 (frozen, immutable)
) -> jax.Array:
    """MTT's ``DiffAugment`` on NHWC images ``x`` with the randomness of ``key``.

    The same ``key`` (and batch size, unless ``params.batchmode``) gives the same
    transformation: pass one key for the real and the synthetic batch for siamese use.
    See the module docstring for the transforms and the ``aug_mode`` semantics.
    Jit-compiled, with ``strategy`` and ``params`` static (one compilation per strategy,
    params and input shape); it also traces into an enclosing ``jax.jit``.
    """
    groups = strategy_groups(strategy)
    if not isinstance(params, DSAParams):
        raise ValueError(f"params must be a DSAParams, got {type(params).__name__}.")
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(
            f"augment expects NHWC images of shape (N, H, W, C), got shape {x.shape} "
            f"({x.ndim}-D)."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if not groups:
        return x
    if params.aug_mode == "M":
        for g, k in zip(groups, jax.random.split(key, len(groups)), strict=True):
            x = _apply_group(g, k, x, params)
        return x
    k_choice, k_aug = jax.random.split(key)
    if len(groups) == 1:
        return _apply_group(groups[0], k_aug, x, params)
    choice = jax.random.randint(k_choice, (), 0, len(groups))
    branches = [
        (lambda xx, g=g: _apply_group(g, k_aug, xx, params)) for g in groups
    ]
    return jax.lax.switch(choice, branches, x)
