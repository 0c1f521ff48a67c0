"""The kernel architectures the notebooks and benchmarks share, built from ``kipnb.stax``.

Each returns the ``(init_fn, apply_fn, kernel_fn)`` triple of ``neural_tangents.stax``.

- :func:`fc`: ``depth`` hidden Dense-ReLU layers and a Dense readout (KIP's FC kernels).
- :func:`convnet`: ``depth`` blocks of 3x3 SAME Conv - ReLU - 2x2 AvgPool, then
  Flatten - Dense (the "ConvNet-3" of the KIP and MTT papers at depth 3). On 28x28
  images the pooling goes 28 -> 14 -> 7 -> 3.

Defaults follow KIP: ``W_std = sqrt(2)``, ``b_std = 0.1`` (hidden layers), NTK
parameterization. The width only matters for the finite networks (``init_fn``).
"""

from __future__ import annotations

import math

from kipnb import stax

__all__ = ["ARCHS", "convnet", "fc", "get", "kernel"]


def fc(
    depth: int = 3,
    width: int = 1024,
    W_std: float = math.sqrt(2.0),
    b_std: float = 0.1,
    num_classes: int = 10,
):
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    layers = [stax.Flatten()]
    for _ in range(depth):
        layers += [stax.Dense(width, W_std=W_std, b_std=b_std), stax.Relu()]
    layers.append(stax.Dense(num_classes, W_std=W_std, b_std=b_std))
    return stax.serial(*layers)


def convnet(
    depth: int = 3,
    width: int = 128,
    W_std: float = math.sqrt(2.0),
    b_std: float = 0.1,
    num_classes: int = 10,
):
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    layers = []
    for _ in range(depth):
        layers += [
            stax.Conv(width, (3, 3), padding="SAME", W_std=W_std, b_std=b_std),
            stax.Relu(),
            stax.AvgPool((2, 2), strides=(2, 2)),
        ]
    layers += [stax.Flatten(), stax.Dense(num_classes, W_std=W_std, b_std=b_std)]
    return stax.serial(*layers)


ARCHS = {"fc": fc, "conv": convnet}


def get(name: str, **kwargs):
    """An architecture by name (``'fc'`` or ``'conv'``)."""
    if name not in ARCHS:
        raise ValueError(f"Unknown architecture {name!r}: use one of {sorted(ARCHS)}.")
    return ARCHS[name](**kwargs)


_KERNELS: dict = {}


def kernel(name: str, num_classes: int = 10, **kwargs):
    """The ``kernel_fn`` of architecture ``name``, one object per setting (cached).

    Jitted functions that take the kernel as a static argument then compile once per
    process.

    Args:
        name: ``'fc'`` or ``'conv'``.
        num_classes: the output width of the readout layer.
        **kwargs: the architecture's arguments (``depth``, ...).

    Returns:
        ``kernel_fn(x1, x2, get)``.

    Example:
        >>> kernel("fc", depth=2) is kernel("fc", depth=2)
        True
    """
    key = (name, num_classes, tuple(sorted(kwargs.items())))
    if key not in _KERNELS:
        _KERNELS[key] = get(name, num_classes=num_classes, **kwargs)[2]
    return _KERNELS[key]
