"""Tests for kipnb.krr: KRR against closed forms computed with NumPy, and Label Solve.

Kernels here are plain functions with the neural-tangents API ``kernel_fn(x1, x2, get)``
(a linear kernel and an RBF); one test uses kipnb.stax's FC NTK when that is importable.
float64 cases run inside ``jax.enable_x64(True)`` so the global setting is untouched.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from kipnb import krr

DTYPES = [np.float32, np.float64]
# Comparison tolerances (relative) by dtype.
RTOL = {np.float32: 2e-4, np.float64: 1e-9}


def x64(dtype):
    """Context enabling 64-bit JAX for float64 cases; a no-op for float32."""
    return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


def linear_kernel(x1, x2, get="ntk"):
    del get
    return jnp.matmul(x1, x2.T, precision=jax.lax.Precision.HIGHEST)


def rbf_kernel(gamma):
    def kernel_fn(x1, x2, get="ntk"):
        del get
        sq = (
            jnp.sum(x1**2, 1)[:, None]
            + jnp.sum(x2**2, 1)[None, :]
            - 2 * jnp.matmul(x1, x2.T, precision=jax.lax.Precision.HIGHEST)
        )
        return jnp.exp(-gamma * jnp.maximum(sq, 0.0))

    return kernel_fn


def rbf_np(a, b, gamma):
    """Independent NumPy RBF, float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.exp(-gamma * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def np_A(k_ss, k_ts, reg):
    """A = K_ts (K_ss + reg * trace/n * I)^{-1} with np.linalg.solve, float64."""
    n = k_ss.shape[0]
    m = k_ss + reg * np.trace(k_ss) / n * np.eye(n)
    return np.linalg.solve(m, k_ts.T).T  # M symmetric


def loss_np(a, y_s, y_t):
    return float(((a @ y_s - y_t) ** 2).sum())


def centered_one_hot_np(labels, c):
    return np.eye(c)[labels] - 1.0 / c


@pytest.fixture(scope="module")
def digits():
    """load_digits scaled to [0, 1]; test = every 4th image (index % 4 == 3)."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    labels = d.target.astype(np.int32)
    test = np.arange(len(labels)) % 4 == 3
    rng = np.random.default_rng(0)
    x_tr, l_tr = x[~test], labels[~test]
    idx = np.concatenate(
        [rng.choice(np.where(l_tr == c)[0], 10, replace=False) for c in range(10)]
    )
    return dict(x_tr=x_tr, l_tr=l_tr, x_te=x[test], l_te=labels[test], x_s=x_tr[idx],
                l_s=l_tr[idx])


# ------------------------------------------------------------------ targets, ridge


def test_one_hot_targets_centered_as_in_kip():
    y = np.asarray(krr.one_hot_targets(np.array([0, 2, 1, 2]), 3))
    expected = np.array(
        [[2, -1, -1], [-1, -1, 2], [-1, 2, -1], [-1, -1, 2]], np.float32
    ) / 3.0
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(y.sum(1), 0.0, atol=1e-6)
    y_plain = np.asarray(krr.one_hot_targets(np.array([0, 2]), 3, centered=False))
    np.testing.assert_array_equal(y_plain, [[1, 0, 0], [0, 0, 1]])
    with jax.enable_x64(True):
        assert krr.one_hot_targets(np.array([1]), 2, dtype=jnp.float64).dtype == jnp.float64


@pytest.mark.parametrize(
    "labels, match",
    [(np.array([0, 3]), r"\[0, 3\).*\[0, 3\]"), (np.array([[0]]), "1-D"),
     (np.array([0.0, 1.0]), "integers")],
)
def test_one_hot_targets_rejects_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        krr.one_hot_targets(labels, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_regularizer_is_reg_times_trace_over_n(dtype):
    with x64(dtype):
        rng = np.random.default_rng(0)
        b = rng.normal(size=(6, 6))
        k = (b @ b.T).astype(dtype)
        reg = 0.3
        added = np.asarray(krr.regularized(jnp.asarray(k), reg), np.float64) - k
        expected = reg * np.trace(k.astype(np.float64)) / 6 * np.eye(6)
        np.testing.assert_allclose(added, expected, rtol=RTOL[dtype], atol=RTOL[dtype])

        # Through the fit: a diagonal kernel gives alpha = y / (d + reg * mean(d)).
        diag = np.array([1.0, 2.0, 3.0, 10.0], dtype)
        y = np.arange(8, dtype=dtype).reshape(4, 2)
        alpha = np.asarray(krr.krr_fit(jnp.asarray(np.diag(diag)), jnp.asarray(y), 0.5))
        assert alpha.dtype == dtype
        np.testing.assert_allclose(alpha, y / (diag + 0.5 * 4.0)[:, None], rtol=RTOL[dtype])


# ---------------------------------------------------------------------------- KRR


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_kernel_krr_equals_closed_form_ridge(dtype):
    rng = np.random.default_rng(1)
    x_s, x_t = rng.normal(size=(20, 8)), rng.normal(size=(30, 8))
    y_s = rng.normal(size=(20, 3))
    reg = 1e-2
    # Independent reference: primal ridge regression W = (X^T X + lam I)^{-1} X^T Y with
    # lam = reg * trace(X X^T) / n_s (K = X X^T is rank 8 < 20, so reg matters).
    lam = reg * np.trace(x_s @ x_s.T) / 20
    w = np.linalg.solve(x_s.T @ x_s + lam * np.eye(8), x_s.T @ y_s)
    expected = x_t @ w
    with x64(dtype):
        xs, xt = jnp.asarray(x_s, dtype), jnp.asarray(x_t, dtype)
        pred = krr.krr(linear_kernel(xs, xs), linear_kernel(xt, xs), jnp.asarray(y_s, dtype),
                       reg)
        assert pred.dtype == dtype
        np.testing.assert_allclose(np.asarray(pred), expected, rtol=0,
                                   atol=50 * RTOL[dtype] * np.abs(expected).max())
        # The split API gives the same thing.
        alpha = krr.krr_fit(linear_kernel(xs, xs), jnp.asarray(y_s, dtype), reg)
        np.testing.assert_allclose(np.asarray(krr.krr_predict(linear_kernel(xt, xs), alpha)),
                                   np.asarray(pred), rtol=1e-5)


def test_predictions_on_support_approach_targets_as_reg_to_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 4))
    y = centered_one_hot_np(rng.integers(0, 5, 30), 5)
    with jax.enable_x64(True):
        k = rbf_kernel(0.5)(jnp.asarray(x), jnp.asarray(x))
        assert np.linalg.matrix_rank(np.asarray(k)) == 30
        errs = [float(jnp.max(jnp.abs(krr.krr(k, k, jnp.asarray(y), reg) - y)))
                for reg in (1e-1, 1e-3, 1e-6, 1e-9)]
    assert errs[0] > 1e-2  # the ridge really does shrink the fit
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-5, errs


def test_accuracy():
    pred = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert float(krr.accuracy(pred, jnp.array([0, 1, 1]))) == pytest.approx(2 / 3)
    targets = krr.one_hot_targets(np.array([0, 1, 0]), 2)
    assert float(krr.accuracy(pred, targets)) == pytest.approx(1.0)


def test_krr_works_under_jit_and_grad():
    rng = np.random.default_rng(3)
    x_s0, x_t = rng.normal(size=(10, 3)), rng.normal(size=(25, 3))
    y_s, y_t = rng.normal(size=(10, 2)), rng.normal(size=(25, 2))
    kfn = rbf_kernel(0.3)

    def loss(x_s):
        pred = krr.krr(kfn(x_s, x_s), kfn(x_t, x_s), y_s, 1e-3)
        return 0.5 * jnp.mean((pred - y_t) ** 2)

    with jax.enable_x64(True):
        x_s0j = jnp.asarray(x_s0)
        assert float(jax.jit(loss)(x_s0j)) == pytest.approx(float(loss(x_s0j)), rel=1e-12)
        g = jax.jit(jax.grad(loss))(x_s0j)
        direction = jnp.asarray(rng.normal(size=x_s0.shape))
        eps = 1e-6
        fd = (loss(x_s0j + eps * direction) - loss(x_s0j - eps * direction)) / (2 * eps)
        assert float(jnp.vdot(g, direction)) == pytest.approx(float(fd), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 7, 64, 10_000])
def test_blockwise_evaluation_equals_unblocked(dtype, block_size):
    rng = np.random.default_rng(4)
    x_s, x_t = rng.normal(size=(12, 5)), rng.normal(size=(50, 5))
    labels_s, labels_t = rng.integers(0, 4, 12), rng.integers(0, 4, 50)
    y_s = centered_one_hot_np(labels_s, 4)
    reg = 1e-3
    # Reference: one unblocked NumPy float64 solve.
    pred = rbf_np(x_t, x_s, 0.2) @ np.linalg.solve(
        rbf_np(x_s, x_s, 0.2) + reg * np.eye(12), y_s)  # trace(K_ss) / n = 1 for an RBF
    ref_acc = float(np.mean(pred.argmax(1) == labels_t))
    ref_mse = float(np.mean((pred - centered_one_hot_np(labels_t, 4)) ** 2))
    with x64(dtype):
        out = krr.krr_evaluate(rbf_kernel(0.2), x_s.astype(dtype), y_s.astype(dtype),
                               x_t.astype(dtype), labels_t, reg=reg, block_size=block_size)
        out_2d = krr.krr_evaluate(rbf_kernel(0.2), x_s.astype(dtype), y_s.astype(dtype),
                                  x_t.astype(dtype), centered_one_hot_np(labels_t, 4),
                                  reg=reg, block_size=block_size)
    assert out["num_targets"] == 50
    assert out["accuracy"] == pytest.approx(ref_acc, abs=1e-12)
    assert out["mse"] == pytest.approx(ref_mse, rel=10 * RTOL[dtype])
    assert out_2d["accuracy"] == out["accuracy"]
    assert out_2d["mse"] == pytest.approx(out["mse"], rel=10 * RTOL[dtype])
    assert 0.0 < ref_acc < 1.0 and ref_mse > 0.0  # the reference is not trivial


# --------------------------------------------------------------------- Label Solve


def _synthetic_ls_problem(seed=5, n_s=15, n_t=200, d=5, c=4):
    rng = np.random.default_rng(seed)
    x_s, x_t = rng.normal(size=(n_s, d)), rng.normal(size=(n_t, d))
    labels_s = rng.integers(0, c, n_s)
    # Targets from a smooth rule so that one-hot support labels are a sensible start.
    labels_t = (np.floor(2 * x_t[:, 0]) % c).astype(int)
    return x_s, labels_s, x_t, labels_t


def test_label_solve_equals_numpy_least_squares_and_beats_one_hot():
    x_s, labels_s, x_t, labels_t = _synthetic_ls_problem()
    gamma, reg = 0.5, 1e-4
    y_t = centered_one_hot_np(labels_t, 4)
    a = np_A(rbf_np(x_s, x_s, gamma), rbf_np(x_t, x_s, gamma), reg)
    assert np.linalg.cond(a) < 1e3  # well posed, so tiny solve_reg is harmless
    y_lstsq = np.linalg.lstsq(a, y_t, rcond=None)[0]
    # The regularised normal equations exactly as documented, for a large solve_reg.
    g = a.T @ a
    mu = 1e-2 * np.trace(g) / 15
    y_tikhonov = np.linalg.solve(g + mu * np.eye(15), a.T @ y_t)
    with jax.enable_x64(True):
        y_ls = np.asarray(krr.label_solve(rbf_kernel(gamma), x_s, x_t, y_t, reg=reg,
                                          solve_reg=1e-12, block_size=64))
        y_reg = np.asarray(krr.label_solve(rbf_kernel(gamma), x_s, x_t, y_t, reg=reg,
                                           solve_reg=1e-2, block_size=64))
        # Evaluating the solved labels with krr_evaluate gives the same loss.
        ev = krr.krr_evaluate(rbf_kernel(gamma), x_s, y_ls, x_t, y_t, reg=reg)
    np.testing.assert_allclose(y_ls, y_lstsq, rtol=0, atol=1e-8)
    np.testing.assert_allclose(y_reg, y_tikhonov, rtol=1e-9, atol=1e-12)
    loss_ls, loss_lstsq = loss_np(a, y_ls, y_t), loss_np(a, y_lstsq, y_t)
    loss_one_hot = loss_np(a, centered_one_hot_np(labels_s, 4), y_t)
    assert loss_ls == pytest.approx(loss_lstsq, rel=1e-10)
    assert loss_ls < 0.9 * loss_one_hot
    assert loss_np(a, y_reg, y_t) >= loss_ls  # the Tikhonov term costs some loss
    assert ev["mse"] == pytest.approx(loss_ls / y_t.size, rel=1e-9)


def test_label_solve_recovers_linear_labels_when_targets_include_support():
    # Linear kernel, n_s = d so K_ss is invertible; labels are linear in the features,
    # y = X W. With the support points among the targets, A has full column rank and
    # y_s = X_s W (+ O(reg)) is the unique zero-loss solution.
    rng = np.random.default_rng(6)
    d = 8
    x_s = rng.normal(size=(d, d))
    x_t = np.concatenate([rng.normal(size=(40, d)), x_s])
    w = rng.normal(size=(d, 3))
    with jax.enable_x64(True):
        y_s = np.asarray(krr.label_solve(linear_kernel, x_s, x_t, x_t @ w, reg=1e-12,
                                         solve_reg=1e-14, block_size=16))
    np.testing.assert_allclose(y_s, x_s @ w, rtol=0, atol=1e-6)
    assert np.abs(x_s @ w).max() > 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_label_solve_recovers_labels_that_generated_targets(dtype):
    # RBF kernel: targets made by KRR from known support labels (support points included
    # in the targets); Label Solve inverts that map.
    x_s, labels_s, x_t, _ = _synthetic_ls_problem(seed=7, n_t=100)
    x_t = np.concatenate([x_t, x_s])
    y_true = centered_one_hot_np(labels_s, 4)
    reg = 1e-3
    y_t = np_A(rbf_np(x_s, x_s, 0.5), rbf_np(x_t, x_s, 0.5), reg) @ y_true
    with x64(dtype):
        y_s = np.asarray(krr.label_solve(rbf_kernel(0.5), x_s.astype(dtype),
                                         x_t.astype(dtype), y_t.astype(dtype), reg=reg,
                                         solve_reg=1e-12 if dtype == np.float64 else 1e-6))
    assert y_s.dtype == dtype
    atol = 1e-7 if dtype == np.float64 else 2e-2
    np.testing.assert_allclose(y_s, y_true, rtol=0, atol=atol)
    np.testing.assert_array_equal(y_s.argmax(1), labels_s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_label_solve_block_size_does_not_change_result(dtype, digits):
    x_s, x_t = digits["x_s"].astype(dtype), digits["x_tr"][:300].astype(dtype)
    y_t = centered_one_hot_np(digits["l_tr"][:300], 10).astype(dtype)
    with x64(dtype):
        results = [
            np.asarray(krr.label_solve(rbf_kernel(0.05), x_s, x_t, y_t, block_size=b))
            for b in (1000, 64, 7)
        ]
    scale = np.abs(results[0]).max()
    assert scale > 0.1
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=0, atol=50 * RTOL[dtype] * scale)


def test_label_solve_on_digits_beats_one_hot(digits):
    """Measured (float32, RBF gamma=0.05, reg=1e-6, 10 images/class, seed 0): test
    accuracy 0.902 with centered one-hot labels, 0.958 with Label Solve over the 1347
    training images; float64 gives the same numbers. Floors are those minus margins."""
    kfn = rbf_kernel(0.05)
    y_s = krr.one_hot_targets(digits["l_s"], 10)
    y_tr = krr.one_hot_targets(digits["l_tr"], 10)
    y_ls = krr.label_solve(kfn, digits["x_s"], digits["x_tr"], y_tr, block_size=500)
    assert y_ls.shape == (100, 10) and y_ls.dtype == jnp.float32
    one_hot_te = krr.krr_evaluate(kfn, digits["x_s"], y_s, digits["x_te"], digits["l_te"])
    ls_te = krr.krr_evaluate(kfn, digits["x_s"], y_ls, digits["x_te"], digits["l_te"])
    one_hot_tr = krr.krr_evaluate(kfn, digits["x_s"], y_s, digits["x_tr"], y_tr)
    ls_tr = krr.krr_evaluate(kfn, digits["x_s"], y_ls, digits["x_tr"], y_tr)
    assert ls_tr["mse"] < 0.7 * one_hot_tr["mse"]  # measured 0.0129 vs 0.0231
    assert one_hot_te["accuracy"] >= 0.87
    assert ls_te["accuracy"] >= 0.93
    assert ls_te["accuracy"] >= one_hot_te["accuracy"] + 0.02


def test_label_solve_float32_default_solve_reg(digits):
    """The float32 default (solve_reg=1e-4) is measured to be near-exact on a
    well-conditioned problem and to keep labels bounded on a rank-deficient one."""
    assert krr.default_solve_reg(jnp.float32) == 1e-4
    assert krr.default_solve_reg(jnp.float64) == 1e-6
    x_s, x_t = digits["x_s"], digits["x_tr"]
    y_t = centered_one_hot_np(digits["l_tr"], 10)
    # (1) RBF, cond(A) ~ 6: the loss equals NumPy float64 lstsq's within 1e-5 relative
    # (measured 2e-7; solve_reg=1e-2 would give 2e-3, 1e-1 gives 0.11).
    a = np_A(rbf_np(x_s, x_s, 0.05), rbf_np(x_t, x_s, 0.05), 1e-6)
    loss_ref = loss_np(a, np.linalg.lstsq(a, y_t, rcond=None)[0], y_t)
    y32 = np.asarray(krr.label_solve(rbf_kernel(0.05), x_s, x_t, y_t.astype(np.float32)),
                     np.float64)
    assert loss_np(a, y32, y_t) == pytest.approx(loss_ref, rel=1e-5)
    # (2) Linear kernel on 64 features with 100 support points: K_ss has rank 64, so A^T A
    # is singular. Measured max |label|: 1.34 with the default, 50 with solve_reg=1e-6,
    # 1365 with 1e-8 (rounding noise amplified along the null space).
    y_lin = krr.label_solve(linear_kernel, x_s, x_t, y_t.astype(np.float32), reg=1e-3)
    assert float(jnp.abs(y_lin).max()) < 5.0


def test_fc_ntk_integration(digits):
    """FC NTK from kipnb.stax (measured float32, with kipnb.stax as of writing: test
    accuracy 0.891 with centered one-hot labels, 0.951 with Label Solve)."""
    from kipnb import stax  # a broken import fails this test loudly

    _, _, kernel_fn = stax.serial(stax.Dense(512), stax.Relu(), stax.Dense(1))
    x_s, x_tr, x_te = digits["x_s"], digits["x_tr"], digits["x_te"]
    k_ss = np.asarray(kernel_fn(x_s, x_s, "ntk"))
    assert k_ss.shape == (100, 100)
    np.testing.assert_allclose(k_ss, k_ss.T, rtol=1e-5, atol=1e-6)
    y_s = krr.one_hot_targets(digits["l_s"], 10)
    y_tr = krr.one_hot_targets(digits["l_tr"], 10)
    y_ls = krr.label_solve(kernel_fn, x_s, x_tr, y_tr, get="ntk", block_size=500)
    one_hot_tr = krr.krr_evaluate(kernel_fn, x_s, y_s, x_tr, y_tr, get="ntk")
    ls_tr = krr.krr_evaluate(kernel_fn, x_s, y_ls, x_tr, y_tr, get="ntk")
    one_hot_te = krr.krr_evaluate(kernel_fn, x_s, y_s, x_te, digits["l_te"], get="ntk",
                                  block_size=100)
    ls_te = krr.krr_evaluate(kernel_fn, x_s, y_ls, x_te, digits["l_te"], get="ntk")
    assert ls_tr["mse"] < 0.8 * one_hot_tr["mse"]  # measured 0.0148 vs 0.0234
    assert one_hot_te["accuracy"] >= 0.86
    assert ls_te["accuracy"] >= 0.93
    assert ls_te["accuracy"] >= one_hot_te["accuracy"] + 0.03


# ------------------------------------------------------------------------- errors


def test_shape_errors_name_the_shapes():
    k = jnp.eye(5)
    with pytest.raises(ValueError, match=r"square.*\(5, 4\)"):
        krr.krr_fit(jnp.ones((5, 4)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match=r"n_s = 5.*\(5, 5\).*\(4, 2\)"):
        krr.krr_fit(k, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"k_ts.*n_s = 5.*\(3, 4\)"):
        krr.krr(k, jnp.ones((3, 4)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match=r"k_ts \(3, 4\).*alpha \(5, 2\)"):
        krr.krr_predict(jnp.ones((3, 4)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match=r"n = 4 rows of pred \(4, 2\), got \(3,\)"):
        krr.accuracy(jnp.ones((4, 2)), jnp.array([0, 1, 1]))


def test_evaluate_and_label_solve_argument_errors():
    rng = np.random.default_rng(8)
    x_s, x_t = rng.normal(size=(6, 3)), rng.normal(size=(10, 3))
    y_s = centered_one_hot_np(np.arange(6) % 2, 2)
    kfn = rbf_kernel(0.5)
    with pytest.raises(ValueError, match="one_hot_targets"):
        krr.label_solve(kfn, x_s, x_t, np.arange(10) % 2)
    with pytest.raises(ValueError, match=r"y_t \(9, 2\).*x_t \(10, 3\)"):
        krr.label_solve(kfn, x_s, x_t, np.zeros((9, 2)))
    with pytest.raises(ValueError, match=r"labels_t \(9,\)"):
        krr.krr_evaluate(kfn, x_s, y_s, x_t, np.zeros(9, int))
    with pytest.raises(ValueError, match=r"same per-example shape"):
        krr.krr_evaluate(kfn, x_s, y_s, x_t[:, :2], np.zeros(10, int))
    with pytest.raises(ValueError, match="block_size"):
        krr.krr_evaluate(kfn, x_s, y_s, x_t, np.zeros(10, int), block_size=0)
    with pytest.raises(ValueError, match="'nngp' or 'ntk'"):
        krr.label_solve(kfn, x_s, x_t, np.zeros((10, 2)), get=("nngp", "ntk"))
    with pytest.raises(ValueError, match="reg must be >= 0"):
        krr.krr_evaluate(kfn, x_s, y_s, x_t, np.zeros(10, int), reg=-1.0)
    with pytest.raises(ValueError, match="solve_reg must be >= 0"):
        krr.label_solve(kfn, x_s, x_t, np.zeros((10, 2)), solve_reg=-1.0)

    def bad_kernel(x1, x2, get):
        return kfn(x1, x2)[:, :-1]

    with pytest.raises(ValueError, match=r"kernel_fn returned shape \(6, 5\)"):
        krr.krr_evaluate(bad_kernel, x_s, y_s, x_t, np.zeros(10, int))


def test_nan_kernel_raises_with_fix():
    k = np.eye(4)
    k[1, 2] = np.nan
    with pytest.raises(FloatingPointError, match=r"k_ss .* 1 NaN .*raise `reg`.*float64"):
        krr.krr_fit(jnp.asarray(k), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="NaN"):  # NumericalError is both
        krr.krr_fit(jnp.asarray(k), jnp.ones((4, 2)))

    rng = np.random.default_rng(9)
    x_s, x_t = rng.normal(size=(6, 3)), rng.normal(size=(10, 3))
    x_t[7, 0] = np.nan
    y_s = centered_one_hot_np(np.arange(6) % 2, 2)
    with pytest.raises(FloatingPointError, match=r"rows 4:8.*check the inputs"):
        krr.krr_evaluate(rbf_kernel(0.5), x_s, y_s, x_t, np.zeros(10, int), block_size=4)
    with pytest.raises(FloatingPointError, match=r"rows 5:10"):
        krr.label_solve(rbf_kernel(0.5), x_s, x_t, np.zeros((10, 2)), block_size=5)


def test_failed_cholesky_raises_with_fix():
    indefinite = jnp.array([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(krr.NumericalError, match=r"Cholesky.*not .*positive definite.*reg"):
        krr.krr_fit(indefinite, jnp.ones((2, 1)), reg=0.0)
    # A zero kernel has trace 0, so the relative ridge cannot rescue it.
    with pytest.raises(ValueError, match="Cholesky"):
        krr.krr(jnp.zeros((3, 3)), jnp.zeros((2, 3)), jnp.ones((3, 1)), reg=1e-3)
    # Label Solve: targets so far away that K_ts == 0 exactly, so A^T A == 0.
    rng = np.random.default_rng(10)
    x_s = rng.normal(size=(5, 2))
    with pytest.raises(FloatingPointError, match=r"Label Solve.*raise `solve_reg`"):
        krr.label_solve(rbf_kernel(50.0), x_s, x_s + 100.0, np.ones((5, 2)))
