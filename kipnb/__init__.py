"""kipnb: teaching and reproduction notebooks for dataset distillation in JAX.

The public API, in the order of the method ladder (each a module, imported on first use):

* data layer: ``data`` (datasets), ``preprocess`` (standardize, layer norm, ZCA)
* the contract: ``distilled`` (:class:`DistilledSet`, format 2)
* kernels: ``stax`` (neural_tangents.stax API), ``archs`` (named kernels)
* ``krr`` (KRR), ``label_solve`` (Label Solve), ``kip`` (KIP), ``sampling``
  (importance init and batches)
* finite networks: ``nets``, ``train`` (KIP's transfer trainer), ``augment`` (DSA),
  ``experts`` (expert trajectories, MTT's evaluation trainer), ``tm`` (MTT, DATM)
* ``evaluate``: ``krr(ds, data)``, ``network(ds, data)`` -- any set, any evaluator
* infrastructure: ``checkpoint``, ``shard``, ``run``, ``repro`` (the reproduction
  suite), ``viz``, ``results``, ``colab``
"""

import importlib

from kipnb.distilled import DistilledSet

__version__ = "0.1.0"

MODULES = (
    "data", "preprocess", "distilled", "stax", "archs", "krr", "label_solve", "kip",
    "sampling", "nets", "train", "augment", "experts", "tm", "evaluate", "checkpoint",
    "shard", "run", "repro", "viz", "results", "colab",
)

__all__ = ["DistilledSet", "__version__", *MODULES]


def __getattr__(name):
    if name in MODULES:
        return importlib.import_module(f"kipnb.{name}")
    raise AttributeError(f"module 'kipnb' has no attribute {name!r}")
