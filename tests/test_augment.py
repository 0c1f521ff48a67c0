"""kipnb.augment: MTT's differentiable siamese augmentation (DiffAugment) in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kipnb import augment as aug
from kipnb.augment import DEFAULT_STRATEGY, DSAParams, augment

ALL_M = DSAParams(aug_mode="M")


@pytest.fixture(scope="module")
def x():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.uniform(size=(4, 8, 8, 3)), jnp.float32)


def key(i):
    return jax.random.PRNGKey(i)


def test_defaults_are_mtts():
    p = DSAParams()
    assert (p.aug_mode, p.prob_flip, p.ratio_scale, p.ratio_rotate, p.ratio_crop_pad,
            p.ratio_cutout, p.brightness, p.saturation, p.contrast, p.batchmode) == (
        "S", 0.5, 1.2, 15.0, 0.125, 0.5, 1.0, 2.0, 0.5, False)


@pytest.mark.parametrize("params", [DSAParams(), ALL_M])
def test_same_key_same_output_and_shape(x, params):
    a = augment(key(3), x, DEFAULT_STRATEGY, params)
    b = augment(key(3), x, DEFAULT_STRATEGY, params)
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(a, b)


def test_different_keys_differ(x):
    outs = [augment(key(i), x, DEFAULT_STRATEGY, ALL_M) for i in range(3)]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_jit_inside_a_jitted_function_matches(x):
    f = jax.jit(lambda k, im: augment(k, im * 1.0, DEFAULT_STRATEGY, ALL_M))
    np.testing.assert_allclose(f(key(5), x), augment(key(5), x, DEFAULT_STRATEGY, ALL_M),
                               atol=1e-6)


@pytest.mark.parametrize("strategy", ["crop", "cutout", "scale", DEFAULT_STRATEGY])
def test_grad_wrt_images_finite_nonzero(x, strategy):
    w = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
    g = jax.grad(lambda im: jnp.sum(augment(key(2), im, strategy, ALL_M) * w))(x)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_flip(x):
    np.testing.assert_array_equal(augment(key(0), x, "flip", DSAParams(prob_flip=1.0)),
                                  x[:, :, ::-1])
    np.testing.assert_array_equal(augment(key(0), x, "flip", DSAParams(prob_flip=0.0)), x)


@pytest.mark.parametrize("strategy,params", [
    ("crop", DSAParams(ratio_crop_pad=0.0)), ("cutout", DSAParams(ratio_cutout=0.0)),
    ("scale", DSAParams(ratio_scale=1.0)), ("rotate", DSAParams(ratio_rotate=0.0)),
    ("none", DSAParams()), ("", DSAParams()),
])
def test_zero_ratio_is_identity(x, strategy, params):
    np.testing.assert_allclose(augment(key(7), x, strategy, params), x, atol=1e-6)


def test_affine_sampler_rotates_like_grid_sample():
    """theta = [[cos, -sin], [sin, cos]] at 90 degrees, align_corners=True: exact rot90."""
    im = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 5, 5, 2)), jnp.float32)
    theta = jnp.array([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]] * 2)
    np.testing.assert_allclose(aug._affine(im, theta), np.rot90(im, k=1, axes=(1, 2)),
                               atol=1e-5)
    half = jnp.array([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]] * 2)  # zoom out x2: border is 0
    out = aug._affine(im, half)
    assert float(out[0, 0, 0, 0]) == 0.0
    np.testing.assert_allclose(out[:, 2, 2], im[:, 2, 2], atol=1e-6)


def test_brightness_shifts_by_the_drawn_amount(x):
    brightness = aug.AUGMENT_FNS["color"][0]
    p = DSAParams(brightness=0.8)
    u = jax.random.uniform(key(4), (x.shape[0],))
    np.testing.assert_allclose(brightness(key(4), x, p) - x,
                               np.broadcast_to(((u - 0.5) * 0.8)[:, None, None, None], x.shape),
                               atol=1e-6)
    # saturation and contrast keep each image's mean: the whole color group shifts the
    # mean by the brightness draw only, within +-brightness/2
    shift = jnp.mean(augment(key(4), x, "color", p) - x, axis=(1, 2, 3))
    assert float(jnp.max(jnp.abs(shift))) <= 0.4 + 1e-6
    kept = augment(key(4), x, "color", DSAParams(brightness=0.0))
    np.testing.assert_allclose(jnp.mean(kept, axis=(1, 2, 3)), jnp.mean(x, axis=(1, 2, 3)),
                               atol=1e-5)


def test_crop_is_a_translation(x):
    out = np.asarray(augment(key(1), x, "crop", DSAParams(ratio_crop_pad=0.25)))
    xs = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for n in range(x.shape[0]):
        ok = [np.array_equal(out[n], xs[n, 2 + a:10 + a, 2 + b:10 + b])
              for a in range(-2, 3) for b in range(-2, 3)]
        assert any(ok), n


def test_cutout_zeros_at_most_a_square():
    ones = jnp.ones((16, 8, 8, 1))
    out = augment(key(0), ones, "cutout", DSAParams(ratio_cutout=0.5))
    zeros = np.asarray(jnp.sum(out == 0, axis=(1, 2, 3)))
    assert zeros.max() == 16 and zeros.min() >= 4  # 4x4, clipped at most to 2x2


def test_single_mode_applies_one_group(x):
    p = DSAParams(prob_flip=1.0, ratio_cutout=0.5)
    flipped = cut = 0
    for i in range(12):
        out = augment(key(i), x, "flip_cutout", p)
        if np.array_equal(out, x[:, :, ::-1]):
            flipped += 1
        else:
            cut += 1
            assert bool(jnp.all((out == x) | (out == 0)))  # cutout only, no flip
    assert flipped and cut
    both = augment(key(0), x, "flip_cutout", DSAParams(aug_mode="M", prob_flip=1.0))
    assert bool(jnp.all((both == x[:, :, ::-1]) | (both == 0)))
    assert int(jnp.sum(both == 0)) > 0


def test_siamese_batchmode(x):
    """batchmode: one draw for the batch, so any two batches get the same transform."""
    p = DSAParams(aug_mode="M", batchmode=True)
    full = augment(key(9), x, DEFAULT_STRATEGY, p)
    part = augment(key(9), x[:2], DEFAULT_STRATEGY, p)
    np.testing.assert_allclose(full[:2], part, atol=1e-6)
    rot = augment(key(9), x, "rotate", p)  # same transform on identical images
    np.testing.assert_allclose(augment(key(9), jnp.repeat(x[:1], 3, 0), "rotate", p),
                               jnp.repeat(rot[:1], 3, 0), atol=1e-6)
    per_sample = augment(key(9), jnp.repeat(x[:1], 3, 0), "rotate", ALL_M)
    assert not np.allclose(per_sample[0], per_sample[1])


def test_errors(x):
    with pytest.raises(ValueError, match=r"Unknown augmentation\(s\) \['blur'\]"):
        augment(key(0), x, "color_blur")
    with pytest.raises(ValueError, match=r"NHWC images of shape \(N, H, W, C\)"):
        augment(key(0), x[0])
    with pytest.raises(ValueError, match="Unknown aug_mode"):
        DSAParams(aug_mode="X")
    with pytest.raises(ValueError, match="ratio_scale must be >= 1"):
        DSAParams(ratio_scale=0.2)
    with pytest.raises(ValueError, match="prob_flip must be a finite number >= 0"):
        DSAParams(prob_flip=-1)
