"""Every matmul and convolution in kernels, KRR and KIP runs at Precision.HIGHEST.

TPUs multiply float32 matrices in bfloat16 unless told otherwise, which ruins KRR
solves. The check walks the jaxpr (including nested jit/remat/loop bodies) and looks at
the ``precision`` of every ``dot_general`` and ``conv_general_dilated``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kipnb import archs, kip, krr, stax

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
MATMULS = ("dot_general", "conv_general_dilated")


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, list | tuple) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def matmul_precisions(fn, *args) -> list:
    """The precision of every matmul/convolution in ``fn(*args)``'s jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    out = []
    for e in _eqns(jaxpr):
        if e.primitive.name in MATMULS:
            p = e.params.get("precision")
            out.append(tuple(p) if isinstance(p, tuple) else (p, p))
    return out


def assert_highest(fn, *args):
    precs = matmul_precisions(fn, *args)
    assert precs, "no matmul found: the check would be vacuous"
    low = [p for p in precs if p != HIGHEST]
    assert not low, f"{len(low)} of {len(precs)} matmuls below HIGHEST: {low}"


def test_the_check_catches_default_precision():
    x = jnp.ones((4, 4))
    with pytest.raises(AssertionError, match="below HIGHEST"):
        assert_highest(lambda a: a @ a, x)
    assert_highest(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST), x)


_, _, FC = archs.fc(depth=2)
_, _, CONV = stax.serial(stax.Conv(8, (3, 3), padding="SAME"), stax.Relu(),
                         stax.AvgPool((2, 2), strides=(2, 2)), stax.Flatten(), stax.Dense(1))
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 32)), jnp.float32)
X2 = X[:3] + 0.5


@pytest.mark.parametrize("kernel_fn", [FC, CONV], ids=["fc", "conv"])
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_kernels_and_their_gradients_run_at_highest(kernel_fn, get):
    assert_highest(lambda a, b: kernel_fn(a, b, get), X, X2)
    assert_highest(lambda a: kernel_fn(a, None, get), X)
    assert_highest(jax.grad(lambda a, b: kernel_fn(a, b, get).sum(), argnums=(0, 1)), X, X2)


def test_krr_and_the_kip_loss_run_at_highest():
    y = krr.one_hot_targets(np.arange(4) % 3, 3)
    yt = krr.one_hot_targets(np.arange(3) % 3, 3)
    assert_highest(lambda a, b: krr.krr(FC(a, None, "ntk"), FC(b, a, "ntk"), y), X, X2)
    loss = lambda a, ys: kip.kip_loss(FC, "ntk", 1e-6, a, ys, X2, yt)[0]  # noqa: E731
    assert_highest(jax.grad(loss, argnums=(0, 1)), X, y)
    # Label Solve's and krr_evaluate's jitted block functions
    lower = jnp.linalg.cholesky(krr.regularized(FC(X, None, "ntk"), 1e-6))
    gram, rhs = jnp.zeros((4, 4)), jnp.zeros((4, 3))
    mask = jnp.ones(3)
    assert_highest(lambda xb: krr._accumulate_normal_equations(FC, "ntk", X, lower, gram, rhs,
                                                               xb, yt, mask), X2)
    alpha = jnp.ones((4, 3))
    assert_highest(lambda xb: krr._evaluate_block(FC, "ntk", X, alpha, xb, yt, mask), X2)
