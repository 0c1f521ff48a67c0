"""kipnb.preprocess: fitted, invertible transforms."""

from __future__ import annotations

import numpy as np
import pytest

from kipnb import data, preprocess
from kipnb.preprocess import ZCA, LayerNorm, Pipeline, Standardize


def correlated_images(n, seed=0, shape=(6, 6, 2)):
    """Full-rank, strongly correlated data shaped as images."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    mix = rng.normal(size=(d, d)) * np.exp(
        -np.arange(d) / 30.0
    )  # decaying spectrum, well conditioned
    return (rng.normal(size=(n, d)) @ mix.T + 3.0).reshape(n, *shape).astype(np.float32)


def test_standardize_per_channel():
    x = correlated_images(2000)
    t = Standardize().fit(x)
    z = t.apply(x)
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, atol=1e-4)
    np.testing.assert_allclose(t.invert(z), x, atol=1e-4)


def test_zca_whitens_at_tiny_regularization():
    x = correlated_images(20000, seed=0)
    t = ZCA(reg=1e-8).fit(x)
    cov = np.cov(t.apply(x).reshape(len(x), -1), rowvar=False)
    assert np.abs(cov - np.eye(72)).max() < 1e-3
    raw_cov = np.cov(x.reshape(len(x), -1), rowvar=False)
    assert np.abs(raw_cov - np.diag(np.diag(raw_cov))).max() > 0.1  # it was correlated
    w = t.whitening_matrix
    np.testing.assert_allclose(w, w.T, atol=1e-10)  # ZCA: the symmetric whitening


def test_zca_on_fresh_samples_is_white_within_sampling_error():
    rng = np.random.default_rng(1)
    d, n = 16, 40000
    mix = rng.normal(size=(d, d))
    train = (rng.normal(size=(n, d)) @ mix.T).reshape(n, 4, 4, 1)
    test = (rng.normal(size=(n, d)) @ mix.T).reshape(n, 4, 4, 1)
    t = ZCA(reg=1e-8).fit(train)
    cov = np.cov(t.apply(test).reshape(n, -1), rowvar=False)
    assert np.abs(cov - np.eye(d)).max() < 6 / np.sqrt(n) * 4  # a few standard errors


def test_zca_inverse_restores_images():
    x = data.load("digits").images  # singular covariance (constant border pixels)
    for reg, relative in [(0.1, True), (1e-4, True), (0.1, False)]:
        t = ZCA(reg=reg, relative=relative).fit(x)
        np.testing.assert_allclose(t.invert(t.apply(x)), x, atol=2e-4)


def test_zca_regularizer_conventions():
    x = correlated_images(3000)
    rel = ZCA(reg=0.1).fit(x)
    cov = np.cov(x.reshape(3000, -1), rowvar=False, bias=True)
    assert rel.eps == pytest.approx(0.1 * np.trace(cov) / 72, rel=1e-6)
    assert ZCA(reg=0.1, relative=False).fit(x).eps == 0.1
    np.testing.assert_allclose(rel.eigenvalues, np.linalg.eigvalsh(cov)[::-1], rtol=1e-6, atol=1e-9)
    # stronger regularization damps more: the whitened variance shrinks
    weak = ZCA(reg=1e-3).fit(x).apply(x).var()
    strong = ZCA(reg=1.0).fit(x).apply(x).var()
    assert strong < weak


def test_layernorm_per_image():
    x = correlated_images(50)
    t = LayerNorm().fit(x)
    z = t.apply(x)
    np.testing.assert_allclose(z.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose((z**2).mean(axis=(1, 2, 3)), 1, atol=1e-4)
    # invert restores an image whose statistics are the fitted averages exactly
    img = z[:1] * t.scale + t.mean
    np.testing.assert_allclose(t.invert(t.apply(img)), img, atol=1e-4)


def test_pipeline_recipe_roundtrip():
    x = correlated_images(1000)
    p = preprocess.make("layernorm_zca", zca_reg=0.05)
    fitted = p.fit(x)
    rebuilt = preprocess.from_recipe(fitted.recipe()).fit(x)
    np.testing.assert_allclose(rebuilt.apply(x[:10]), fitted.apply(x[:10]), atol=1e-6)
    assert fitted.recipe() == {
        "kind": "pipeline",
        "steps": [{"kind": "layernorm"}, {"kind": "zca", "reg": 0.05, "relative": True}],
    }
    np.testing.assert_allclose(
        preprocess.make("standardize_zca")
        .fit(x)
        .invert(preprocess.make("standardize_zca").fit(x).apply(x[:5])),
        x[:5],
        atol=1e-3,
    )
    assert isinstance(preprocess.make("none"), Pipeline)
    np.testing.assert_array_equal(preprocess.make("none").fit(x).apply(x), x)


def test_errors():
    x = correlated_images(10)
    with pytest.raises(ValueError, match="not fitted: call .fit"):
        ZCA().apply(x)
    with pytest.raises(ValueError, match="ZCA reg must be > 0"):
        ZCA(reg=0.0)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\); got shape \(10, 72\)"):
        Standardize().fit(x.reshape(10, -1))
    with pytest.raises(ValueError, match="fitted on images of 72 values"):
        ZCA().fit(x).apply(np.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="Unknown preprocessing 'pca'"):
        preprocess.make("pca")


def test_zca_kornia_is_the_absolute_zca_and_method_names_tell_them_apart():
    x = correlated_images(500)
    k = preprocess.make("zca_kornia", zca_reg=0.1, relative=True).fit(x)  # relative ignored
    assert not k.steps[0].relative and k.steps[0].eps == 0.1
    r = preprocess.make("zca", zca_reg=0.1).fit(x)
    assert r.steps[0].relative and r.steps[0].eps != 0.1
    assert not preprocess.equal(k, r)
    names = {m: preprocess.method_name(preprocess.make(m)) for m in preprocess.METHODS}
    assert names == {m: m for m in preprocess.METHODS}
    assert preprocess.method_name(None) == "none"
    assert preprocess.method_name(preprocess.make("zca", relative=False)) == "zca_kornia"
    assert preprocess.method_name(preprocess.make("zca", zca_reg=0.01)) == "zca(reg=0.01)"
    assert preprocess.method_name(Pipeline((ZCA(), Standardize()))) == "zca+standardize"
