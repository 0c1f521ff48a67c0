"""kipnb: teaching and reproduction notebooks for dataset distillation in JAX.

Modules: ``data`` (datasets), ``preprocess`` (standardize, ZCA), ``distilled``
(``DistilledSet``), ``run`` (papermill runner), ``viz``, ``results``, ``colab``.
"""

from kipnb.distilled import DistilledSet

__all__ = ["DistilledSet", "__version__"]
__version__ = "0.1.0"
