"""Infrastructure under the methods: checkpoints, devices, input checks, results files,
figures and Colab support.

* :mod:`kipnb.loop` -- the long-run driver: checkpoints, exact resume, NaN stop, history.
* :mod:`kipnb.checkpoint` -- atomic checkpoints that resume exactly.
* :mod:`kipnb.shard` -- kernel blocks and batches across ``jax.devices()``.
* :mod:`kipnb.checks` -- shared input validation.
* :mod:`kipnb.results` -- ``results.json`` with machine, JAX version and commit.
* :mod:`kipnb.viz` -- image grids and training curves.
* :mod:`kipnb.colab` -- the notebooks' Colab setup cell.

Import them by their short names: ``from kipnb import checkpoint``.
"""
