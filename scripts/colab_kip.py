"""The KIP colab's FC-1 loop (google-research kip/KIP.ipynb, one import away).

Shared by ``scripts/make_nt_fixtures.py`` (run with neural-tangents' ``stax`` in the
pinned environment, to write ``tests/fixtures/nt_kip_fc1.npz``) and ``tests/test_kip.py``
(run with ``kipnb.stax``): one copy of the loop, so the two runs cannot drift apart.
It imports neither library; the caller passes the ``stax`` module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def colab_fc1_kip(stax, x_init, y_init, x_pool, y_pool, batches, learning_rate):
    """The colab's FC-1 KIP loop (its code, one import away); returns (losses, x_final).

    tests/test_kip.py runs this same function with ``kipnb.stax``.
    """
    import functools

    from jax import scipy as sp
    from jax.example_libraries import optimizers

    layers = [stax.Flatten(), stax.Dense(1024, W_std=np.sqrt(2), b_std=0.1), stax.Relu(),
              stax.Dense(10, W_std=np.sqrt(2), b_std=0.1)]
    _, _, kernel_fn = stax.serial(*layers)
    kernel_fn = jax.jit(functools.partial(kernel_fn, get="ntk"))

    def loss_fn(params, x_target, y_target, reg=1e-6):
        x_support, y_support = params["x"], jax.lax.stop_gradient(params["y"])
        k_ss = kernel_fn(x_support, x_support)
        k_ts = kernel_fn(x_target, x_support)
        k_ss_reg = (k_ss + jnp.abs(reg) * jnp.trace(k_ss) * jnp.eye(k_ss.shape[0])
                    / k_ss.shape[0])
        pred = jnp.dot(k_ts, sp.linalg.solve(k_ss_reg, y_support, assume_a="pos"))
        return 0.5 * jnp.mean((pred - y_target) ** 2)

    opt_init, opt_update, get_params = optimizers.adam(learning_rate)
    opt_state = opt_init({"x": jnp.asarray(x_init), "y": jnp.asarray(y_init)})

    @jax.jit
    def update_fn(step, opt_state, x_target, y_target):
        loss, grads = jax.value_and_grad(loss_fn)(get_params(opt_state), x_target, y_target)
        return opt_update(step, grads, opt_state), loss

    losses = []
    for i, rows in enumerate(batches, start=1):
        opt_state, loss = update_fn(i, opt_state, x_pool[rows], y_pool[rows])
        losses.append(float(loss))
    return np.array(losses), np.asarray(get_params(opt_state)["x"])
