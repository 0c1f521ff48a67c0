"""Rung 1 of the ladder: infinite-width network kernels.

* :mod:`kipnb.stax` -- layers with the ``neural_tangents.stax`` API: each returns
  ``(init_fn, apply_fn, kernel_fn)``; ``kernel_fn(x1, x2, get)`` gives the NNGP and NTK.
* :mod:`kipnb.archs` -- the named kernels the notebooks use (FC-*d*, ConvNet-*d*, Myrtle).

Import them by their short names: ``from kipnb import stax``.
"""
