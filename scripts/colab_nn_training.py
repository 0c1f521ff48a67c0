"""The learning-rate cell of google-research ``kip/nn_training.ipynb``, one import away.

Shared by ``scripts/make_nt_fixtures.py`` (run with neural-tangents, in the pinned
environment, to write ``tests/fixtures/nt_nn_training.npz``) and ``tests/test_stax.py``
(run with ``kipnb.stax`` in both roles): one copy of the code, so the two runs cannot
drift apart. It imports neither library; the caller passes ``nt`` (``neural_tangents``,
or ``kipnb.stax``, which has ``batch``, ``empirical_ntk_fn`` and
``predict.max_learning_rate``) and ``stax``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp


def convnet(stax, width: int, depth: int, num_classes: int = 10):
    """The colab's ``ConvNet`` (prepend_conv_layer, Relu, no norm, Flatten, 'standard')."""
    conv = functools.partial(stax.Conv, W_std=2**0.5, b_std=0.1, padding="SAME",
                             parameterization="standard")
    layers = [conv(width, (3, 3), dimension_numbers=("NHWC", "HWIO", "NHWC")), stax.Relu()]
    for _ in range(depth):
        layers += [conv(width, (3, 3)), stax.Identity(), stax.Relu(),
                   stax.AvgPool((2, 2), strides=(2, 2))]
    layers += [stax.Flatten(), stax.Dense(num_classes, 2**0.5, 0.1,
                                          parameterization="standard")]
    return stax.serial(*layers)


def max_lr_estimate(nt, f, params, input_sample, batch_size: int, num_classes: int = 10):
    """The colab's "Estimate maximum learning rate" lines; returns (kernel, max_lr)."""

    def logit_reduced_f(params, x):
        out = f(params, x)
        return jnp.sum(out, axis=-1) / out.shape[-1]**(1 / 2)

    empirical_kernel_fn = lambda x1, x2, params: nt.empirical_ntk_fn(  # noqa: E731
        logit_reduced_f, trace_axes=(), vmap_axes=0, implementation=1)(x1, x2, params)
    empirical_kernel_fn = nt.batch(empirical_kernel_fn, batch_size=batch_size)
    kernel = empirical_kernel_fn(input_sample, None, params)
    y_train_size = kernel.shape[0] * num_classes
    max_lr = nt.predict.max_learning_rate(
        ntk_train_train=kernel, y_train_size=y_train_size, eps=1e-12)
    return kernel, max_lr
