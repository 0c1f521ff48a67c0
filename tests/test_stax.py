"""Tests of kipnb.stax: values against neural-tangents 0.6.5, Monte Carlo, transformations.

The reference values in tests/fixtures/nt_reference.npz were computed by real
neural-tangents 0.6.5 in float64 with scripts/make_nt_fixtures.py (a separate, pinned
environment); this test run does not need that environment.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kipnb import stax

FIXTURES = np.load(Path(__file__).parent / "fixtures" / "nt_reference.npz")
CASES = sorted({k.split("/")[0] for k in FIXTURES.files if not k.startswith("meta/")})
# The cases with a reference gradient (dense, Erf, standard parameterization, banded and
# full conv storage); only a few, because compiling gradients dominates the test time.
GRAD_CASES = [c for c in CASES if f"{c}/grad_ntk" in FIXTURES.files]
LAYERS = ("serial", "Dense", "Conv", "Relu", "LeakyRelu", "Abs", "Erf", "AvgPool",
          "GlobalAvgPool", "Flatten", "Gelu", "LayerNorm")


def build(arch: str):
    """Evaluates an architecture expression of the fixture file with kipnb's layers."""
    return eval(arch, {"__builtins__": {}}, {n: getattr(stax, n) for n in LAYERS})  # noqa: S307


def weights(shape) -> np.ndarray:
    """Same fixed weights as scripts/make_nt_fixtures.py uses for its gradient."""
    n = int(np.prod(shape))
    return np.cos(0.7 * np.arange(n) + 0.3).reshape(shape)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, the comparison metric of the brief."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def convnet(depth=2, width=16):
    layers = []
    for _ in range(depth):
        layers += [stax.Conv(width, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
                   stax.AvgPool((2, 2), (2, 2))]
    return stax.serial(*layers, stax.Flatten(), stax.Dense(1, W_std=1.2, b_std=0.1))


def fc(depth=2, width=64):
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu()]
    return stax.serial(*layers, stax.Dense(1, W_std=1.5, b_std=0.1))


# Shared networks: kernel_fn's compiled code is cached per network and input shape, so
# tests that reuse these (with the shapes below) do not compile again.
CONV = convnet(depth=1)
FC = fc()
NETS = {"fc": FC, "conv": CONV}
RNG = np.random.default_rng(0)
X_IMG = RNG.standard_normal((4, 8, 8, 2)).astype(np.float32)
Y_IMG = RNG.standard_normal((3, 8, 8, 2)).astype(np.float32)
X_VEC = RNG.standard_normal((5, 10)).astype(np.float32)
Y_VEC = RNG.standard_normal((4, 10)).astype(np.float32)


# --------------------------------------------------------------------------- fixtures


def test_fixture_file_is_from_neural_tangents_065():
    import json

    versions = json.loads(str(FIXTURES["meta/versions"]))
    assert versions["neural_tangents"] == "0.6.5"
    assert len(CASES) >= 12 and len(GRAD_CASES) >= 5
    for case in CASES:
        assert FIXTURES[f"{case}/ntk"].dtype == np.float64


@pytest.mark.parametrize("case", CASES)
def test_matches_neural_tangents_float64(case):
    """NNGP and NTK (x1 vs x2, and x2=None) equal neural-tangents' to 1e-5 relative."""
    with jax.enable_x64(True):
        _, _, kernel_fn = build(str(FIXTURES[f"{case}/arch"]))
        x1, x2 = FIXTURES[f"{case}/x1"], FIXTURES[f"{case}/x2"]
        # One compiled program for both calls (compilation dominates this test's time).
        k, k_same = jax.jit(lambda a, b: (kernel_fn(a, b), kernel_fn(a, None)))(x1, x2)
        assert k.ntk.dtype == jnp.float64
        errors = {
            "nngp": rel_err(k.nngp, FIXTURES[f"{case}/nngp"]),
            "ntk": rel_err(k.ntk, FIXTURES[f"{case}/ntk"]),
            "nngp_same": rel_err(k_same.nngp, FIXTURES[f"{case}/nngp_same"]),
            "ntk_same": rel_err(k_same.ntk, FIXTURES[f"{case}/ntk_same"]),
        }
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradient_matches_neural_tangents_float64(case):
    with jax.enable_x64(True):
        _, _, kernel_fn = build(str(FIXTURES[f"{case}/arch"]))
        x1, x2 = FIXTURES[f"{case}/x1"], FIXTURES[f"{case}/x2"]
        R = weights(FIXTURES[f"{case}/ntk"].shape)
        grad = jax.jit(jax.grad(lambda a: jnp.sum(R * kernel_fn(a, x2, "ntk"))))(x1)
    assert rel_err(grad, FIXTURES[f"{case}/grad_ntk"]) < 1e-5


@pytest.mark.parametrize("case", ["fc3_bias", "erf_pool_band", "gap_net", "layernorm_conv_band"])
def test_float32_agrees_with_float64_reference(case):
    """float32 kernels (the default dtype) agree with the float64 reference."""
    _, _, kernel_fn = build(str(FIXTURES[f"{case}/arch"]))
    x1 = FIXTURES[f"{case}/x1"].astype(np.float32)
    x2 = FIXTURES[f"{case}/x2"].astype(np.float32)
    k, k_same = jax.jit(lambda a, b: (kernel_fn(a, b), kernel_fn(a)))(x1, x2)
    assert k.nngp.dtype == jnp.float32 and k_same.ntk.dtype == jnp.float32
    assert rel_err(k.nngp, FIXTURES[f"{case}/nngp"]) < 1e-5
    assert rel_err(k.ntk, FIXTURES[f"{case}/ntk"]) < 1e-5
    # The diagonal of x2=None is where 1 - cos(angle)**2 cancels; still float32-accurate.
    assert rel_err(k_same.ntk, FIXTURES[f"{case}/ntk_same"]) < 1e-5


def test_float64_inside_context_does_not_leak():
    _, _, kernel_fn = FC
    with jax.enable_x64(True):
        k64 = kernel_fn(X_VEC.astype(np.float64), None, "ntk")
    k32 = kernel_fn(X_VEC, None, "ntk")
    assert k64.dtype == jnp.float64 and k32.dtype == jnp.float32
    assert not jax.config.jax_enable_x64
    assert rel_err(k32, k64) < 1e-6


# --------------------------------------------------------------------------- Monte Carlo


def empirical_nngp(net, x, seeds: int):
    """Per-seed empirical NNGPs ``f(x) f(x)^T / n_out`` of finite nets from init_fn/apply_fn."""
    init_fn, apply_fn, _ = net

    def one(key):
        _, params = init_fn(key, x.shape)
        f = apply_fn(params, x)
        return f @ f.T / f.shape[-1]

    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    return np.asarray(jax.jit(lambda k: jax.lax.map(one, k))(keys), np.float64)


def mc_agrees(samples: np.ndarray, kernel: np.ndarray) -> tuple[bool, float, float]:
    """Whether the seed average matches ``kernel`` within sampling error.

    Each of the ``S`` seeds gives an independent estimate; their spread gives the standard
    error of the mean, ``se = std / sqrt(S)``. An entry agrees when it is within 4.5
    standard errors (a two-sided t-test with S-1 degrees of freedom at ~1e-3, per entry)
    plus 1% of the kernel's scale for the O(1/width) finite-width bias (widths >= 512,
    depth 2, so the bias is ~0.1-0.5%).
    """
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / math.sqrt(len(samples))
    scale = np.max(np.abs(kernel))
    ok = np.all(np.abs(mean - kernel) <= 4.5 * se + 0.01 * scale)
    return bool(ok), float(np.max(np.abs(mean - kernel)) / scale), float(np.max(se) / scale)


def test_monte_carlo_fc():
    x = np.random.default_rng(10).standard_normal((4, 8)).astype(np.float32)

    def net(w_std):
        return stax.serial(stax.Dense(2048, W_std=w_std, b_std=0.1), stax.Relu(),
                           stax.Dense(2048, W_std=1.5, b_std=0.1), stax.Relu(),
                           stax.Dense(2048, W_std=1.5, b_std=0.1))

    samples = empirical_nngp(net(1.5), x, seeds=24)
    ok, err, se = mc_agrees(samples, np.asarray(net(1.5)[2](x, None, "nngp")))
    assert ok, (err, se)
    assert err < 0.05 and se < 0.02
    # Power: a 10% larger first-layer W_std (kernel ~17% larger) is rejected.
    wrong = np.asarray(net(1.65)[2](x, None, "nngp"))
    assert not mc_agrees(samples, wrong)[0]


def test_monte_carlo_conv():
    x = np.random.default_rng(11).standard_normal((4, 6, 6, 2)).astype(np.float32)

    def net(w_std):
        return stax.serial(
            stax.Conv(512, (3, 3), padding="SAME", W_std=w_std, b_std=0.1), stax.Relu(),
            stax.AvgPool((2, 2), (2, 2)),
            stax.Conv(512, (3, 3), padding="SAME", W_std=1.4), stax.Relu(),
            stax.Flatten(), stax.Dense(2048, W_std=1.2))

    samples = empirical_nngp(net(1.4), x, seeds=16)
    ok, err, se = mc_agrees(samples, np.asarray(net(1.4)[2](x, None, "nngp")))
    assert ok, (err, se)
    assert err < 0.05 and se < 0.03
    # Power: a 10% larger first-layer W_std (kernel ~17% larger) is rejected.
    assert not mc_agrees(samples, np.asarray(net(1.54)[2](x, None, "nngp")))[0]


def test_init_apply_shapes_and_parameterizations():
    init_fn, apply_fn, _ = stax.serial(
        stax.Conv(7, (3, 3), strides=(2, 2), padding="SAME", b_std=0.1), stax.Relu(),
        stax.AvgPool((2, 2)), stax.Conv(5, (2, 2), parameterization="standard", b_std=0.3),
        stax.GlobalAvgPool(), stax.Dense(3, parameterization="standard"))
    out_shape, params = init_fn(jax.random.PRNGKey(1), (-1, 9, 9, 2))
    assert out_shape == (-1, 3)
    assert params[0][0].shape == (3, 3, 2, 7) and params[0][1].shape == (1, 1, 1, 7)
    x = np.random.default_rng(12).standard_normal((4, 9, 9, 2)).astype(np.float32)
    y = jax.jit(apply_fn)(params, x)
    assert y.shape == (4, 3) and np.all(np.isfinite(y))
    # NTK parameterization: unit-variance weights, the scale is in apply_fn.
    _, p = stax.Dense(4000, W_std=2.0)[0](jax.random.PRNGKey(2), (1, 100))
    assert abs(float(np.std(p[0])) - 1.0) < 0.02
    # Standard parameterization: W ~ N(0, W_std**2 / fan_in).
    _, p = stax.Dense(4000, W_std=2.0, parameterization="standard")[0](
        jax.random.PRNGKey(2), (1, 100))
    assert abs(float(np.std(p[0])) - 0.2) < 0.004


# --------------------------------------------------------------------------- transformations


def inputs(name):
    return (X_VEC, Y_VEC) if name == "fc" else (X_IMG, Y_IMG)


@pytest.mark.parametrize("name", ["fc", "conv"])
def test_jit_matches_eager(name):
    _, _, kernel_fn = NETS[name]
    x, y = inputs(name)
    eager = kernel_fn(x, y, ("nngp", "ntk"))
    jitted = jax.jit(kernel_fn, static_argnames="get")(x, y, get=("nngp", "ntk"))
    np.testing.assert_allclose(jitted.nngp, eager.nngp, rtol=1e-6, atol=0)
    np.testing.assert_allclose(jitted.ntk, eager.ntk, rtol=1e-6, atol=0)
    assert eager.ntk.shape == (len(x), len(y))


@pytest.mark.parametrize("name", ["fc", "conv"])
def test_gradients_finite_at_identical_inputs(name):
    """x1 == x2 is the arccos/sqrt boundary; gradients must stay finite (no NaN/inf)."""
    _, _, kernel_fn = NETS[name]
    x = inputs(name)[0]
    x = np.concatenate([x, x[:2]])  # duplicated rows: more pairs on the boundary

    def grads(x, get):
        g_same = jax.grad(lambda a: jnp.sum(kernel_fn(a, None, get)))(x)
        g1 = jax.grad(lambda a: jnp.sum(kernel_fn(a, x, get)))(x)
        g2 = jax.grad(lambda b: jnp.sum(kernel_fn(x, b, get)))(x)
        return g_same, g1, g2

    # The NTK's path contains the NNGP's; for the conv net one get keeps compile time low.
    for get in ("nngp", "ntk") if name == "fc" else ("ntk",):
        g_same, g1, g2 = jax.jit(grads, static_argnums=1)(x, get)
        for g in (g_same, g1, g2):
            assert np.all(np.isfinite(g)), get
            assert np.max(np.abs(g)) > 0
        # K(x1, x2) with x2 == x1 is symmetric, so the two partial gradients agree, and
        # K(x, x) counts each pair twice as often as a one-sided derivative sees it.
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g_same, g1 + g2, rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_differences_float64():
    """d/dx sum K(x, x) (smooth: diagonal and distinct pairs) against central differences."""
    with jax.enable_x64(True):
        for name in ("fc", "conv"):
            _, _, kernel_fn = NETS[name]
            x = jnp.asarray(inputs(name)[0], jnp.float64)
            d = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape))
            for get in ("nngp", "ntk") if name == "fc" else ("ntk",):
                def f(a, get=get, kernel_fn=kernel_fn):
                    return jnp.sum(kernel_fn(a, None, get))

                eps = 1e-5
                fd = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
                ad = jnp.vdot(jax.jit(jax.grad(f))(x), d)
                assert abs(float(fd - ad)) <= 1e-6 * max(1.0, abs(float(fd))), (get, fd, ad)


def test_vmap_matches_loop():
    _, _, kernel_fn = CONV
    xs = np.random.default_rng(13).standard_normal((3, 2, 8, 8, 2)).astype(np.float32)
    out = jax.vmap(lambda a: kernel_fn(a, Y_IMG, "ntk"))(xs)
    assert out.shape == (3, 2, 3)
    for i in range(3):
        np.testing.assert_allclose(out[i], kernel_fn(xs[i], Y_IMG, "ntk"), rtol=1e-5)


def test_kernel_is_symmetric_psd():
    _, _, kernel_fn = CONV
    x = np.concatenate([X_IMG, Y_IMG])
    for get in ("nngp", "ntk"):
        k = np.asarray(kernel_fn(x, None, get), np.float64)
        np.testing.assert_allclose(k, k.T, rtol=1e-5)
        assert np.linalg.eigvalsh(k).min() > -1e-5 * np.abs(k).max()
        kxy = kernel_fn(X_IMG, Y_IMG, get)
        np.testing.assert_allclose(kxy, k[:4, 4:], rtol=1e-5)


def test_get_forms():
    _, _, kernel_fn = FC
    both = kernel_fn(X_VEC, Y_VEC)
    assert type(both).__name__ == "Kernel" and both._fields == ("nngp", "ntk")
    nngp = kernel_fn(X_VEC, Y_VEC, "nngp")
    assert isinstance(nngp, jax.Array) and nngp.shape == (5, 4)
    rev = kernel_fn(X_VEC, Y_VEC, ("ntk", "nngp"))
    assert rev._fields == ("ntk", "nngp")
    np.testing.assert_allclose(rev.ntk, both.ntk, rtol=1e-6)
    np.testing.assert_allclose(rev[1], nngp, rtol=1e-6)
    one = kernel_fn(X_VEC, Y_VEC, ("ntk",))
    assert one._fields == ("ntk",)
    assert type(one) is type(kernel_fn(X_VEC, None, ("ntk",)))  # one cached type per fields
    np.testing.assert_array_equal(one.ntk, both.ntk)
    assert not np.allclose(both.ntk, both.nngp)


# --------------------------------------------------------------------------- storage plan


def test_storage_plan_convnet_uses_narrow_bands():
    """ConvNet-3 on 28x28 stores offsets |p - q| <= 7, 3, 1, 0 per block, not all pairs."""
    layers = []
    for _ in range(3):
        layers += [stax.Conv(8, (3, 3), padding="SAME"), stax.Relu(),
                   stax.AvgPool((2, 2), (2, 2))]
    _, _, kernel_fn = stax.serial(*layers, stax.Flatten(), stax.Dense(1))
    plan = stax._make_plan(kernel_fn._kipnb_layers, (2, 28, 28, 1), (2, 28, 28, 1))
    radii = [tuple(None if d.full else d.r for d in dims) for dims in plan.dims]
    assert radii[0] == (7, 7) and radii[3] == (3, 3) and radii[6] == (1, 1)
    assert radii[9] == (0, 0) and radii[10] == ()
    assert plan.entries() == 28 * 15 * 28 * 15  # vs 784 * 784 for the full covariance
    _, _, gap = stax.serial(stax.Conv(8, (3, 3)), stax.Relu(), stax.GlobalAvgPool())
    plan = stax._make_plan(gap._kipnb_layers, (1, 9, 9, 1), (1, 9, 9, 1))
    assert all(d.full for dims in plan.dims for d in dims)


def test_fast_arctan2_accuracy():
    ys = np.concatenate([np.linspace(-3, 3, 301), [0.0, 1e-30, -1e-30, 1e30]])
    xs = np.concatenate([np.linspace(-3, 3, 299), [0.0, 1e-30, -1e-30, 1e30]])
    y, x = np.meshgrid(ys, xs)
    for dtype, tol in ((np.float32, 4e-7), (np.float64, 5e-16)):
        with jax.enable_x64(dtype == np.float64):
            got = np.asarray(stax._safe_arctan2(jnp.asarray(y, dtype), jnp.asarray(x, dtype),
                                                math.pi / 2))
        ref = np.arctan2(y.astype(np.float64), x.astype(np.float64))
        ref[(y == 0) & (x == 0)] = math.pi / 2
        assert got.dtype == dtype
        assert np.max(np.abs(got - ref)) <= tol * math.pi * 2


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("name", ["fc", "conv"])
def test_batch_equals_unblocked(name):
    _, _, kernel_fn = NETS[name]
    rng = np.random.default_rng(14)
    x = rng.standard_normal((7, 10) if name == "fc" else (7, 8, 8, 2)).astype(np.float32)
    y = rng.standard_normal((5, 10) if name == "fc" else (5, 8, 8, 2)).astype(np.float32)
    blocked = stax.batch(kernel_fn, 3)
    full = kernel_fn(x, y, ("nngp", "ntk"))
    part = blocked(x, y, ("nngp", "ntk"))
    assert part._fields == ("nngp", "ntk") and part.ntk.shape == (7, 5)
    np.testing.assert_allclose(part.nngp, full.nngp, rtol=2e-6)
    np.testing.assert_allclose(part.ntk, full.ntk, rtol=2e-6)
    np.testing.assert_allclose(blocked(x, None, "ntk"), kernel_fn(x, x, "ntk"), rtol=2e-6)
    g_full, g_part = jax.jit(lambda b: (
        jax.grad(lambda c: jnp.sum(kernel_fn(x, c, "ntk")))(b),
        jax.grad(lambda c: jnp.sum(blocked(x, c, "ntk")))(b)))(y)
    np.testing.assert_allclose(g_part, g_full, rtol=1e-5, atol=1e-7)


def test_internal_chunking_does_not_change_values(monkeypatch):
    """kernel_fn's cache-sized chunks (lax.map, remat) give the whole-batch values."""
    results = []
    with jax.enable_x64(True):
        x, y = X_IMG.astype(np.float64), Y_IMG.astype(np.float64)
        for block_bytes in (1, 2**40):  # one image / pair per chunk; no chunking
            monkeypatch.setitem(stax._BLOCK_BYTES, "cpu", block_bytes)
            _, _, kernel_fn = convnet(depth=1)  # fresh network: compiled per network
            k = kernel_fn(x, y)
            g = jax.jit(jax.grad(lambda a, kf=kernel_fn: jnp.sum(kf(a, y, "ntk"))))(x)
            results.append((k.nngp, k.ntk, g))
    for small, whole in zip(*results, strict=True):
        assert rel_err(small, whole) < 1e-13


def test_batch_size_zero_and_errors():
    _, _, kernel_fn = FC
    assert stax.batch(kernel_fn, 0) is kernel_fn  # neural-tangents' "no batching"
    with pytest.raises(ValueError, match="positive number of rows"):
        stax.batch(kernel_fn, -2)
    with pytest.raises(ValueError, match="Unknown kernel get='cov2'"):
        stax.batch(kernel_fn, 2)(X_VEC, Y_VEC, "cov2")


def test_batch_identical_in_float64():
    with jax.enable_x64(True):
        _, _, kernel_fn = CONV
        x, y = X_IMG.astype(np.float64), Y_IMG.astype(np.float64)
        assert rel_err(stax.batch(kernel_fn, 2)(x, y, "ntk"), kernel_fn(x, y, "ntk")) < 1e-13


def test_batch_memory_is_bounded_for_60000_images():
    """60000 training images against a support set: compiled temp memory stays small."""
    _, _, kernel_fn = CONV
    blocked = stax.batch(kernel_fn, 1000)
    x1 = jax.ShapeDtypeStruct((60000, 8, 8, 2), jnp.float32)
    x2 = jax.ShapeDtypeStruct((100, 8, 8, 2), jnp.float32)
    mem = jax.jit(lambda a, b: blocked(a, b, "ntk")).lower(x1, x2).compile().memory_analysis()
    plan = stax._make_plan(kernel_fn._kipnb_layers, x1.shape, x2.shape)
    all_at_once = 60000 * 100 * plan.entries() * 4  # one covariance array, ~17 GB
    assert mem.temp_size_in_bytes < 0.01 * all_at_once
    assert mem.temp_size_in_bytes < 256 * 2**20


# --------------------------------------------------------------------------- errors


def test_error_conv_on_vectors():
    _, _, kernel_fn = CONV
    with pytest.raises(ValueError, match=r"expects 4-D inputs NHWC.*got 2-D.*x\.reshape"):
        kernel_fn(X_VEC)


def test_error_dense_on_images_without_flatten():
    _, _, kernel_fn = stax.serial(stax.Conv(4, (3, 3)), stax.Relu(), stax.Dense(1))
    with pytest.raises(ValueError, match=r"layer 2 \(Dense\) expects 2-D inputs.*got 4-D.*"
                                         r"Flatten\(\) or GlobalAvgPool\(\)"):
        kernel_fn(X_IMG)
    _, apply_fn, _ = stax.Dense(3)
    with pytest.raises(ValueError, match="Flatten"):
        apply_fn((jnp.ones((2, 3)), None), X_IMG)


def test_error_feature_mismatch():
    _, _, kernel_fn = CONV
    with pytest.raises(ValueError, match=r"x1 and x2 must agree.*channel/feature"):
        kernel_fn(X_IMG, X_IMG[..., :1])
    _, _, kernel_fn = FC
    with pytest.raises(ValueError, match=r"x1\.shape=\(5, 10\) and x2\.shape=\(4, 9\)"):
        kernel_fn(X_VEC, Y_VEC[:, :9])


def test_error_unknown_get():
    _, _, kernel_fn = FC
    with pytest.raises(ValueError, match=r"Unknown kernel get='cov1'.*'nngp' and 'ntk'"):
        kernel_fn(X_VEC, None, "cov1")
    with pytest.raises(ValueError, match=r"Unknown kernel get='NTK'"):
        kernel_fn(X_VEC, None, ("nngp", "NTK"))
    with pytest.raises(ValueError, match="not understood"):
        kernel_fn(X_VEC, None, 3)
    with pytest.raises(ValueError, match="names a kernel twice"):
        kernel_fn(X_VEC, None, ("ntk", "ntk"))


def test_error_pool_window_larger_than_image():
    _, _, kernel_fn = stax.serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu(),
                                  stax.AvgPool((2, 2), (2, 2)), stax.AvgPool((8, 8)),
                                  stax.Flatten())
    with pytest.raises(ValueError, match=r"layer 3 \(AvgPool\).*window \(8, 8\) is larger "
                                         r"than the 4x4 image.*smaller window"):
        kernel_fn(X_IMG)


def test_error_conv_filter_larger_than_valid_image():
    _, _, kernel_fn = stax.serial(stax.Conv(4, (5, 5)), stax.Relu(), stax.Conv(4, (5, 5)))
    with pytest.raises(ValueError, match=r"layer 2 \(Conv\).*filter \(5, 5\) is larger than "
                                         r"the 4x4 input with padding='VALID'.*'SAME'"):
        kernel_fn(X_IMG)


def test_error_nonlinearity_needs_gaussian_input():
    _, _, kernel_fn = stax.serial(stax.Relu(), stax.Dense(1))
    with pytest.raises(ValueError, match=r"nonlinearity must be Gaussian.*Dense/Conv before"):
        kernel_fn(X_VEC)


def test_error_rank_and_unsupported_options():
    _, _, kernel_fn = FC
    with pytest.raises(ValueError, match="at least 2-D"):
        kernel_fn(np.ones(10, np.float32))
    with pytest.raises(ValueError, match="CIRCULAR"):
        stax.Conv(4, (3, 3), padding="CIRCULAR")
    with pytest.raises(ValueError, match="parameterization='mup' is not supported"):
        stax.Dense(4, parameterization="mup")
    with pytest.raises(ValueError, match="channels-last"):
        stax.Dense(4, channel_axis=0)
    with pytest.raises(ValueError, match="not a kipnb.stax layer"):
        stax.serial((lambda *a: None, lambda *a: None, lambda *a: None))
    with pytest.raises(ValueError, match=r"strides=\(1,\) must have 2 entries"):
        stax.Conv(4, (3, 3), strides=(1,))


def test_leading_flatten_of_images_equals_kernel_of_flat_vectors():
    """The fast path (flatten raw images, one matmul) gives the (N, D) kernel and grads."""
    _, _, kf = stax.serial(stax.Flatten(), stax.Dense(64, W_std=1.5, b_std=0.1), stax.Relu(),
                           stax.Dense(1))
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(5, 6, 6, 2)).astype(np.float32)
    x2 = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
    for get in ("nngp", "ntk"):
        img = np.asarray(kf(x1, x2, get))
        flat = np.asarray(kf(x1.reshape(5, -1), x2.reshape(4, -1), get))
        np.testing.assert_allclose(img, flat, rtol=1e-6)
    g_img = jax.grad(lambda a: kf(a, x2, "ntk").sum())(jnp.asarray(x1))
    g_flat = jax.grad(lambda a: kf(a, x2.reshape(4, -1), "ntk").sum())(jnp.asarray(x1.reshape(5, -1)))
    np.testing.assert_allclose(np.asarray(g_img).reshape(5, -1), np.asarray(g_flat), rtol=1e-5)


def test_finite_net_with_avgpool_is_differentiable_under_jit():
    init_fn, apply_fn, _ = stax.serial(stax.Conv(4, (3, 3), padding="SAME"), stax.Relu(),
                                       stax.AvgPool((2, 2), strides=(2, 2), padding="SAME",
                                                    normalize_edges=True), stax.Flatten(),
                                       stax.Dense(3))
    _, params = init_fn(jax.random.key(0), (-1, 5, 5, 1))
    x = jnp.ones((2, 5, 5, 1))
    g = jax.jit(jax.grad(lambda p: jnp.sum(apply_fn(p, x) ** 2)))(params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(g))
    assert float(sum(jnp.abs(leaf).sum() for leaf in jax.tree_util.tree_leaves(g))) > 0


def _fc_ntk_at_angle_zero(x, depth, W_std, b_std):
    """Exact NTK of a Relu FC net on a pair of identical inputs (angle 0 at every layer)."""
    W2, b2 = W_std**2, b_std**2
    q = W2 * np.array([math.fsum(r * r) for r in x]) / x.shape[1] + b2
    ntk = q
    for _ in range(depth):  # Relu at angle 0: E[relu(u)^2] = q / 2, E[relu'(u)^2] = 1 / 2
        q = W2 * q / 2 + b2
        ntk = q + W2 * ntk / 2
    return ntk


@pytest.mark.parametrize("depth", [1, 3])
def test_identical_pairs_are_exactly_at_angle_zero_float64(depth):
    # 784 features: diag(x @ x.T) and sum(x * x) differ by tens of eps here, which a 4-eps
    # threshold did not cover (the diagonal then carried a ~1e-8 angle error).
    W_std, b_std = math.sqrt(2.0), 0.1
    with jax.enable_x64(True):
        _, _, kfn = stax.serial(stax.Flatten(), *[
            layer for _ in range(depth)
            for layer in (stax.Dense(1024, W_std=W_std, b_std=b_std), stax.Relu())],
            stax.Dense(10, W_std=W_std, b_std=b_std))
        x = np.random.default_rng(3).standard_normal((40, 28, 28, 1))
        exact = _fc_ntk_at_angle_zero(x.reshape(40, -1), depth, W_std, b_std)
        xj = jnp.asarray(x)
        for k in (kfn(xj, xj + 0.0, "ntk"), kfn(xj, None, "ntk")):
            assert k.dtype == jnp.float64
            assert np.max(np.abs(np.diagonal(np.asarray(k)) / exact - 1)) < 1e-12
        g = jax.grad(lambda a: jnp.sum(kfn(a, xj, "ntk")))(xj)
        assert np.all(np.isfinite(np.asarray(g)))


def test_identical_pairs_float32_diagonal():
    _, _, kfn = stax.serial(stax.Flatten(), stax.Dense(8, W_std=1.4, b_std=0.1), stax.Relu(),
                            stax.Dense(1, W_std=1.4, b_std=0.1))
    x = np.random.default_rng(4).standard_normal((30, 784)).astype(np.float32)
    exact = _fc_ntk_at_angle_zero(x.astype(np.float64), 1, 1.4, 0.1)
    k = np.asarray(kfn(jnp.asarray(x), jnp.asarray(x) + 0.0, "ntk"))
    assert k.dtype == np.float32
    assert np.max(np.abs(np.diagonal(k) / exact - 1)) < 2e-6


def test_boundary_threshold_scales_with_rounding():
    assert stax.boundary_ulps(1) == 8
    assert stax.boundary_ulps(784) == pytest.approx(8 * 28)


def test_apply_fn_refuses_unknown_keywords():
    import jax

    init_fn, apply_fn, _ = stax.serial(stax.Dense(4), stax.Relu(), stax.Dense(2))
    _, params = init_fn(jax.random.PRNGKey(0), (-1, 3))
    x = np.ones((2, 3), np.float32)
    out = apply_fn(params, x)
    np.testing.assert_array_equal(apply_fn(params, x, rng=jax.random.PRNGKey(1)), out)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['mode'\]"):
        apply_fn(params, x, mode="train")
    d_init, d_apply, _ = stax.Dense(2)
    _, p = d_init(jax.random.PRNGKey(0), (-1, 3))
    with pytest.raises(TypeError, match="unexpected keyword"):
        d_apply(p, x, mask=None)


# --------------------------------------------------------------------------- Gelu, LayerNorm


def test_layernorm_and_gelu_finite_layers():
    x = np.random.default_rng(3).standard_normal((2, 4, 4, 3)).astype(np.float32)
    _, apply_fn, _ = stax.LayerNorm(axis=(1, 2, 3))
    y = np.asarray(apply_fn((), x))
    np.testing.assert_allclose(y.reshape(2, -1).mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.reshape(2, -1).std(1), 1.0, rtol=1e-4)
    y = np.asarray(stax.LayerNorm()[1]((), x))  # per pixel, over channels
    np.testing.assert_allclose(y.std(-1), 1.0, rtol=1e-3)
    for approximate in (False, True):
        np.testing.assert_allclose(stax.Gelu(approximate)[1]((), x),
                                   jax.nn.gelu(x, approximate=approximate), rtol=1e-6)


def test_layernorm_kernel_is_the_normalised_covariance():
    """FC: LayerNorm after Dense turns the NNGP into the inputs' cosine similarity (and
    divides the NTK by the same norms), up to eps."""
    _, _, kernel_fn = stax.serial(stax.Dense(8, W_std=1.7, b_std=0.0), stax.LayerNorm())
    k = kernel_fn(X_VEC, Y_VEC)
    cos = (X_VEC @ Y_VEC.T) / np.outer(np.linalg.norm(X_VEC, axis=1),
                                       np.linalg.norm(Y_VEC, axis=1))
    np.testing.assert_allclose(k.nngp, cos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k.ntk, cos, rtol=1e-5, atol=1e-6)  # one layer: NTK = NNGP


def test_layernorm_errors():
    x = np.ones((2, 4, 4, 3), np.float32)
    conv = stax.Conv(4, (3, 3), padding="SAME")
    with pytest.raises(ValueError, match="does not include the channel axis"):
        stax.serial(conv, stax.LayerNorm(axis=(1, 2)))[2](x)  # instance norm
    with pytest.raises(ValueError, match="includes the batch axis 0"):
        stax.serial(conv, stax.LayerNorm(axis=(0, 3)))[2](x)
    with pytest.raises(ValueError, match="must be Gaussian"):
        stax.serial(conv, stax.Relu(), stax.LayerNorm())[2](x)
    with pytest.raises(ValueError, match="channel_axis"):
        stax.LayerNorm(channel_axis=1)
    # instance norm still runs as a finite layer (as in neural-tangents)
    assert stax.LayerNorm(axis=(1, 2))[1]((), x).shape == x.shape


def test_nn_training_notebook_stax_names_exist():
    """Every stax name Google Research's kip/nn_training.ipynb uses exists, and its
    ConvNet (prepended conv, LayerNorm blocks, Gelu) builds, runs and has a kernel."""
    import functools

    for name in ("Relu", "Erf", "Identity", "Gelu", "LayerNorm", "Conv", "AvgPool",
                 "GlobalAvgPool", "Flatten", "Dense", "serial"):
        assert callable(getattr(stax, name)), name
    conv = functools.partial(stax.Conv, W_std=2**0.5, b_std=0.1, padding="SAME",
                             parameterization="standard")
    for act, norm, head in ((stax.Gelu(), stax.LayerNorm(axis=(1, 2, 3)), stax.Flatten()),
                            (stax.Relu(), stax.Identity(), stax.GlobalAvgPool())):
        layers = [conv(8, (3, 3), dimension_numbers=("NHWC", "HWIO", "NHWC")), act]
        for _ in range(2):
            layers += [conv(8, (3, 3)), norm, act, stax.AvgPool((2, 2), strides=(2, 2))]
        init_fn, f, kernel_fn = stax.serial(*layers, head,
                                            stax.Dense(10, 2**0.5, 0.1,
                                                       parameterization="standard"))
        _, params = init_fn(jax.random.PRNGKey(0), (-1, 8, 8, 3))
        assert f(params, X_IMG[:, :, :, :1].repeat(3, -1)).shape == (4, 10)
    # The LayerNorm/Gelu variant's kernel is the fixture case nn_training_convnet (with
    # Relu) and layernorm_conv_band (Gelu); here the GlobalAvgPool variant's.
    k = kernel_fn(X_IMG[:2, :, :, :1].repeat(3, -1), None, "ntk")
    assert k.shape == (2, 2) and bool(jnp.all(jnp.isfinite(k)))


def test_nn_training_max_lr_cell_matches_neural_tangents():
    """The colab's learning-rate cell (nt.batch over nt.empirical_ntk_fn, then
    nt.predict.max_learning_rate), run with kipnb.stax in place of neural-tangents on
    neural-tangents' own parameters, gives its kernel and learning rate."""
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "colab_nn_training", root / "scripts" / "colab_nn_training.py")
    colab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colab)
    ref = np.load(Path(__file__).parent / "fixtures" / "nt_nn_training.npz")
    run = json.loads(str(ref["run"]))
    init_fn, f, _ = colab.convnet(stax, run["width"], run["depth"])
    _, mine = init_fn(jax.random.PRNGKey(0), (-1, *run["image"]))
    leaves, tree = jax.tree_util.tree_flatten(mine)
    theirs = [ref[f"params/{i}"] for i in range(len(leaves))]
    assert [v.shape for v in theirs] == [v.shape for v in leaves]  # same parameter layout
    with jax.enable_x64(True):
        params = tree.unflatten([jnp.asarray(v) for v in theirs])
        x = jnp.asarray(ref["x"])
        kernel, max_lr = colab.max_lr_estimate(stax, f, params, x, run["batch_size"])
        assert kernel.shape == (run["n"], run["n"]) and kernel.dtype == jnp.float64
        assert rel_err(kernel, ref["kernel"]) < 1e-10
        assert abs(max_lr / float(ref["max_lr"]) - 1) < 1e-10
        full = stax.empirical_ntk_fn(f, trace_axes=())(x, None, params)  # (N, N, 10, 10)
        assert rel_err(full, ref["ntk_full"]) < 1e-10
        assert abs(stax.predict.max_learning_rate(full) / float(ref["max_lr_full"]) - 1) < 1e-10
        lr_m = stax.max_learning_rate(full, y_train_size=run["n"] * 10, momentum=0.9)
        assert abs(lr_m / float(ref["max_lr_momentum"]) - 1) < 1e-10
    with pytest.raises(ValueError, match="expected a train-train kernel"):
        stax.max_learning_rate(np.ones((3, 4)))
    with pytest.raises(ValueError, match="not finite"):
        stax.max_learning_rate(np.full((2, 2), np.nan))


def test_batch_passes_extra_arguments_and_pytrees():
    """batch() hands params (empirical kernels) and get through to every block and
    assembles pytree outputs; a block that is not (N1, N2, ...) is a clear error."""
    init_fn, apply_fn, kernel_fn = _tiny_net()
    _, params = init_fn(jax.random.PRNGKey(1), X_VEC.shape)
    ntk_fn = stax.empirical_kernel_fn(apply_fn)
    whole = ntk_fn(X_VEC, Y_VEC, ("nngp", "ntk"), params)
    blocked = stax.batch(ntk_fn, 2)(X_VEC, Y_VEC, ("nngp", "ntk"), params)
    assert blocked._fields == ("nngp", "ntk")
    for a, b in zip(blocked, whole, strict=True):
        assert a.shape == b.shape == (5, 4)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    k = stax.batch(kernel_fn, 2)(X_VEC, None, get="nngp")  # get as a keyword
    np.testing.assert_allclose(k, kernel_fn(X_VEC, None, "nngp"), rtol=1e-5)
    with pytest.raises(ValueError, match="must start with the two inputs' row axes"):
        stax.batch(lambda a, b: jnp.sum(a) * jnp.ones(3), 2)(X_VEC, Y_VEC)


# --------------------------------------------------------------------------- empirical kernels


def _tiny_net():
    return stax.serial(stax.Dense(6, b_std=0.1), stax.Gelu(), stax.Dense(3, W_std=1.3))


def test_empirical_kernels_match_their_definitions():
    init_fn, apply_fn, _ = _tiny_net()
    _, params = init_fn(jax.random.PRNGKey(1), X_VEC.shape)
    f1, f2 = apply_fn(params, X_VEC), apply_fn(params, Y_VEC)
    f1, f2 = np.asarray(f1), np.asarray(f2)
    nngp = stax.empirical_nngp_fn(apply_fn)(X_VEC, Y_VEC, params)
    np.testing.assert_allclose(nngp, f1 @ f2.T / 3, rtol=1e-5)
    full = stax.empirical_nngp_fn(apply_fn, trace_axes=())(X_VEC, Y_VEC, params)
    assert full.shape == (5, 4, 3, 3)
    np.testing.assert_allclose(full, np.einsum("ac,bd->abcd", f1, f2), rtol=1e-5)
    diag = stax.empirical_nngp_fn(apply_fn, trace_axes=(), diagonal_axes=(-1,))(
        X_VEC, Y_VEC, params)
    np.testing.assert_allclose(diag, np.einsum("ac,bc->abc", f1, f2), rtol=1e-5)
    # NTK: sum over parameters of Jacobian products, traced over the logits.
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacobian(lambda p, x: apply_fn(unravel(p), x)))
    j1, j2 = np.asarray(jac(flat, X_VEC)), np.asarray(jac(flat, Y_VEC))  # (N, 3, P)
    ntk_full = np.einsum("acp,bdp->abcd", j1, j2)
    ntk = jax.jit(stax.empirical_ntk_fn(apply_fn, implementation=2))(X_VEC, Y_VEC, params)
    np.testing.assert_allclose(ntk, np.trace(ntk_full, axis1=2, axis2=3) / 3, rtol=1e-4)
    k = jax.jit(lambda p: stax.empirical_kernel_fn(apply_fn, trace_axes=())(
        X_VEC, None, ("ntk", "nngp"), p))(params)
    assert k._fields == ("ntk", "nngp") and k.ntk.shape == (5, 5, 3, 3)
    j = np.asarray(j1)
    np.testing.assert_allclose(k.ntk, np.einsum("acp,bdp->abcd", j, j), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="share an axis"):
        stax.empirical_nngp_fn(apply_fn, trace_axes=(-1,), diagonal_axes=(1,))(
            X_VEC, None, params)
    with pytest.raises(ValueError, match="NtkImplementation"):
        stax.empirical_ntk_fn(apply_fn, implementation=7)


def test_monte_carlo_kernel_fn_api():
    init_fn, apply_fn, _ = _tiny_net()
    key = jax.random.PRNGKey(2)
    mc = stax.monte_carlo_kernel_fn(init_fn, apply_fn, key, 6)
    k = mc(X_VEC, Y_VEC)
    assert k._fields == ("nngp", "ntk") and k.nngp.shape == (5, 4)
    # The mean of the per-network empirical kernels, with neural-tangents' key sequence.
    emp = jax.jit(lambda k: stax.empirical_kernel_fn(apply_fn)(
        X_VEC, Y_VEC, "ntk", init_fn(k, X_VEC.shape)[1]))
    total, sub = 0.0, key
    for _ in range(6):
        sub, this = jax.random.split(sub)
        init_key, _ = jax.random.split(this)
        total = total + emp(init_key)
    np.testing.assert_allclose(k.ntk, total / 6, rtol=1e-5)
    # A generator over sample counts ends at the same estimate; batching changes nothing.
    gen = stax.monte_carlo_kernel_fn(init_fn, apply_fn, key, [6, 2])(X_VEC, Y_VEC)
    ests = list(gen)  # the same compiled sample as mc (one cache per network and options)
    assert len(ests) == 2
    np.testing.assert_allclose(ests[-1].ntk, k.ntk, rtol=1e-6)
    batched = stax.monte_carlo_kernel_fn(init_fn, apply_fn, key, 6, batch_size=4)
    np.testing.assert_allclose(batched(X_VEC, Y_VEC, "nngp"), k.nngp, rtol=1e-5)
    with pytest.raises(ValueError, match="must be positive"):
        stax.monte_carlo_kernel_fn(init_fn, apply_fn, key, 0)
    with pytest.raises(TypeError, match="integer or an iterable"):
        stax.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2.5)


def test_random_features_converge_to_convnet_nngp_at_the_predicted_rate():
    """Monte Carlo NNGP of finite ConvNets (kipnb.archs.convnet, readout width = width, on
    8x8 digits) against kipnb.stax's exact NNGP. The relative RMS error of the mean of
    ``n`` random networks of width ``w`` should fall like ``1 / sqrt(n * w)`` (plus an
    O(1/w) bias): 4x the samples or 4x the width halves it in theory; asserted < 0.7x.
    Errors are averaged over disjoint groups of the 128 samples per width (measured with
    seeds 0-2: 4x samples gave 0.49-0.60x, 4x width 0.53-0.63x)."""
    from sklearn.datasets import load_digits

    from kipnb import archs

    images = load_digits().images[:6, :, :, None].astype(np.float32) / 16.0
    x = (images - images.mean()) / images.std()
    exact = np.asarray(archs.convnet(depth=2, width=1, num_classes=1)[2](x, None, "nngp"),
                       np.float64)
    m = 128

    def per_sample(width):
        init_fn, apply_fn, _ = archs.convnet(depth=2, width=width, num_classes=width)
        mc = stax.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0),
                                        range(1, m + 1))
        means = np.stack([np.asarray(k, np.float64) for k in mc(x, None, "nngp")])
        n = np.arange(1, m + 1)[:, None, None]
        return means * n - np.concatenate([np.zeros_like(means[:1]), means[:-1] * n[:-1]])

    def error(samples, n):
        groups = samples.reshape(-1, n, *samples.shape[1:]).mean(1)
        return float(np.sqrt(np.mean((groups - exact) ** 2) / np.mean(exact**2)))

    narrow, wide = per_sample(16), per_sample(64)
    assert error(wide, 8) < 0.7 * error(wide, 2), (error(wide, 2), error(wide, 8))
    assert error(wide, 32) < 0.7 * error(wide, 8), (error(wide, 8), error(wide, 32))
    assert error(wide, 2) < 0.7 * error(narrow, 2), (error(narrow, 2), error(wide, 2))
    assert error(wide, m) < 0.06


@pytest.mark.parametrize("a, b", [(0.0, 1.0), (-1.0, 1.0), (0.2, 1.5)])
def test_arccos_vjp_matches_autodiff_of_the_formula(a, b):
    """The written-out VJP of the ReLU-family kernel equals autodiff of its closed form
    (away from the boundary), with broadcast variances summed back to their shapes, and
    is 0 through the square root on the boundary (an image paired with itself)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        x = rng.standard_normal((7, 9))
        y = rng.standard_normal((5, 9))
        k11 = jnp.asarray(np.sum(x * x, 1)[:, None] / 9 + 0.1)
        k22 = jnp.asarray(np.sum(y * y, 1)[None] / 9 + 0.1)
        k12 = jnp.asarray(x @ y.T / 9 + 0.1)
        w = jnp.asarray(rng.standard_normal((2, 7, 5)))

        def closed(k12, k11, k22):
            root = jnp.sqrt(k11 * k22 - k12 * k12)
            angle = jnp.arctan2(root, k12)
            f = (a - b) ** 2 / (2 * math.pi)
            dot = (a * a + b * b) / 2 - f * angle
            return f * root + dot * k12, dot

        def loss(fn, *args):
            nngp, dot = fn(*args)
            return jnp.sum(w[0] * nngp) + jnp.sum(w[1] * dot)

        layer = stax._ABRelu(a, b, "test")
        ours = jax.grad(lambda *k: loss(lambda *kk: layer.cross(*kk, True), *k),
                        argnums=(0, 1, 2))(k12, k11, k22)
        ref = jax.grad(lambda *k: loss(closed, *k), argnums=(0, 1, 2))(k12, k11, k22)
        for g, r in zip(ours, ref, strict=True):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
        # On the boundary (k12**2 == k11 * k22): the square root's derivative is 0, so
        # only the dot * k12 term and d(dot)/dk12 = 0 (angle pinned at 0) remain.
        v = jnp.asarray([1.3, 0.7])
        g12, g11, g22 = jax.grad(lambda k12, k11, k22: jnp.sum(layer.cross(k12, k11, k22,
                                                                          False)[0]),
                                 argnums=(0, 1, 2))(v, v, v)
        np.testing.assert_allclose(g12, [(a * a + b * b) / 2] * 2, rtol=1e-12)
        np.testing.assert_allclose(g11, [0, 0], atol=0)
        np.testing.assert_allclose(g22, [0, 0], atol=0)


def test_convnet_kernel_gradient_finite_for_nearly_identical_pairs():
    """Pairs a few eps from the boundary (correlation ~1, not snapped) must keep finite
    gradients in float32: a ConvNet-kernel KIP step on Fashion-MNIST once got inf there,
    when XLA recomputed k11*k22 - k12**2 with other rounding inside the written-out VJP."""
    from kipnb import archs

    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((4, 12, 12, 1)).astype(np.float32)
    kfn = archs.kernel("conv", num_classes=10, depth=2)
    for scale in (1e-4, 3e-4, 1e-3, 3e-3):
        x2 = (x1 + scale * rng.standard_normal(x1.shape)).astype(np.float32)
        x2 = np.concatenate([x2, x1[:1]])
        g = jax.grad(lambda a, x2=x2: jnp.sum(jnp.sin(kfn(jnp.asarray(x2), a, "ntk"))))(
            jnp.asarray(x1))
        assert np.isfinite(np.asarray(g)).all(), scale


@pytest.mark.parametrize("n,r", [(5, 0), (7, 2), (9, 3), (2, 0)])
def test_band_storage_helpers_match_their_definitions(n, r):
    """_to_band / _to_full / _diag / _at_q (gathers, and for radius 0 a reshape) equal
    their index definitions."""
    with jax.enable_x64(True):
        _check_band_storage(n, r)


def _check_band_storage(n, r):
    rng = np.random.default_rng(n + r)
    full = rng.standard_normal((2, n, n, 3))  # (N, p, q, rest)
    dim_full, dim_band = stax._Dim(n, True, n - 1), stax._Dim(n, False, r)
    band = np.asarray(stax._to_band(jnp.asarray(full), 1, dim_full, r))
    p, j = np.meshgrid(np.arange(n), np.arange(2 * r + 1), indexing="ij")
    q = p + j - r
    want = np.where(((q >= 0) & (q < n))[None, :, :, None],
                    full[:, p, np.clip(q, 0, n - 1)], 0.0)
    np.testing.assert_array_equal(band, want)
    back = np.asarray(stax._to_full(jnp.asarray(band), 1, dim_band))
    pp, qq = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    np.testing.assert_array_equal(back, np.where((abs(pp - qq) <= r)[None, :, :, None], full, 0.0))
    np.testing.assert_array_equal(np.asarray(stax._diag(jnp.asarray(full), [dim_full])),
                                  full[:, np.arange(n), np.arange(n)])
    v = rng.standard_normal((2, n))
    vq = np.asarray(stax._at_q(jnp.asarray(v), [dim_band]))
    np.testing.assert_array_equal(vq, np.where((q >= 0) & (q < n), v[:, np.clip(q, 0, n - 1)], 0.0))


@pytest.mark.parametrize("a_shape,b_shape,target", [
    ((4, 3, 5, 1, 6, 1), (1, 3, 5, 1, 6, 1), (4, 1, 5, 1, 6, 1)),  # a cross pass's k11
    ((4, 3, 5, 1, 6, 1), (4, 1, 5, 1, 6, 1), (1, 3, 5, 1, 6, 1)),  # ... and k22
    ((4, 5, 3, 6, 3), (4, 5, 3, 6, 3), (4, 5, 1, 6, 1)),  # a self pass's band axes
    ((4, 3, 5, 5), (4, 1, 5, 1), (1, 3, 1, 5)),  # full dimensions
    ((4, 3), (4, 3), (4, 3)),  # nothing to reduce
])
def test_mul_sum_to_and_its_vjp(a_shape, b_shape, target):
    with jax.enable_x64(True):
        _check_mul_sum_to(a_shape, b_shape, target)


def _check_mul_sum_to(a_shape, b_shape, target):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    prod = a * b
    axes = tuple(i for i, n in enumerate(target) if n == 1 and prod.shape[i] != 1)
    want = prod.sum(axis=axes, keepdims=True)
    got = np.asarray(stax._mul_sum_to(jnp.asarray(a), jnp.asarray(b), target))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    x, y = rng.standard_normal((3, 1, 4)), rng.standard_normal((1, 5, 4))
    gx, gy = jax.grad(lambda x, y: jnp.sum(jnp.sin(stax._bmul(x, y))), (0, 1))(x, y)
    rx, ry = jax.grad(lambda x, y: jnp.sum(jnp.sin(x * y)), (0, 1))(x, y)
    np.testing.assert_allclose(gx, rx, rtol=1e-12)
    np.testing.assert_allclose(gy, ry, rtol=1e-12)
