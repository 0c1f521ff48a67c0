"""Small argument checks shared by the config classes.

Example:
    >>> import numpy as np
    >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
    (True, True, False, False)
"""

from __future__ import annotations

import numpy as np

__all__ = ["int_fields", "is_int"]


def is_int(v) -> bool:
    """Whether ``v`` is an integer (Python or NumPy), not a bool.

    Args:
        v: any value.

    Returns:
        True for ``int`` and ``np.integer`` values other than ``True``/``False``.
    """
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def int_fields(config, minimums) -> None:
    """Check that each named field of ``config`` is an integer at least its minimum.

    Args:
        config: a config object (its class name starts the message).
        minimums: ``(name, minimum)`` pairs.

    Raises:
        ValueError: naming the field, its value and the bound.

    Example:
        >>> from types import SimpleNamespace
        >>> int_fields(SimpleNamespace(steps=0), [("steps", 1)])
        Traceback (most recent call last):
        ...
        ValueError: SimpleNamespace.steps=0: must be an integer >= 1.
    """
    for name, minimum in minimums:
        v = getattr(config, name)
        if not is_int(v) or v < minimum:
            raise ValueError(
                f"{type(config).__name__}.{name}={v!r}: must be an integer >= {minimum}.")
