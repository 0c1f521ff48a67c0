"""Small argument checks shared by the config classes.

Example:
    >>> import numpy as np
    >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
    (True, True, False, False)
"""

from __future__ import annotations

import numpy as np

__all__ = ["is_int"]


def is_int(v) -> bool:
    """Whether ``v`` is an integer (Python or NumPy), not a bool.

    Args:
        v: any value.

    Returns:
        True for ``int`` and ``np.integer`` values other than ``True``/``False``.
    """
    return isinstance(v, int | np.integer) and not isinstance(v, bool)
