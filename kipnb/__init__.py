"""kipnb: teaching and reproduction notebooks for dataset distillation in JAX.

The public API, in the order of the method ladder (each a module, imported on first use):

* data layer: ``data`` (datasets), ``preprocess`` (standardize, layer norm, ZCA)
* the contract: ``distilled`` (:class:`DistilledSet`, format 2)
* kernels: ``stax`` (neural_tangents.stax API), ``archs`` (named kernels)
* ``krr`` (KRR), ``label_solve`` (Label Solve), ``kip`` (KIP), ``rfad`` and
  ``frepo`` (KIP's affordable successors), ``sampling``
  (importance init and batches)
* finite networks: ``nets``, ``train`` (KIP's transfer trainer), ``augment`` (DSA),
  ``experts`` (expert trajectories, MTT's evaluation trainer), ``tm`` (MTT, DATM)
* ``evaluate``: ``krr(ds, data)``, ``network(ds, data)`` -- any set, any evaluator
* infrastructure: ``loop`` (the long-run driver), ``checkpoint``, ``shard``, ``checks``,
  ``viz``, ``results``, ``colab``
* commands: ``run`` (notebooks, ``python -m kipnb.run``), ``repro`` (the reproduction
  suite, ``python -m kipnb.run --repro``), ``course`` (coursework)

The files are grouped the same way (``kernels/``, ``methods/``, ``finite/``, ``infra/``);
every module is imported by its short name (``from kipnb import stax``), see
:data:`LOCATIONS`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

#: Where each public module lives. The files are grouped by rung of the method ladder
#: (``kernels/``, ``methods/``, ``finite/``) with the infrastructure apart (``infra/``);
#: the data flow (``data``, ``preprocess``, ``distilled``, ``evaluate``) and the commands
#: (``run``, ``course``) sit at the top. Every module is public under its short name:
#: ``from kipnb import kip`` and ``import kipnb.kip`` give the same module object as
#: ``kipnb.methods.kip``.
LOCATIONS = {
    "data": "kipnb.data",
    "preprocess": "kipnb.preprocess",
    "distilled": "kipnb.distilled",
    "stax": "kipnb.kernels.stax",
    "archs": "kipnb.kernels.archs",
    "krr": "kipnb.methods.krr",
    "label_solve": "kipnb.methods.label_solve",
    "kip": "kipnb.methods.kip",
    "rfad": "kipnb.methods.rfad",
    "frepo": "kipnb.methods.frepo",
    "sampling": "kipnb.methods.sampling",
    "nets": "kipnb.finite.nets",
    "train": "kipnb.finite.train",
    "augment": "kipnb.finite.augment",
    "experts": "kipnb.methods.experts",
    "tm": "kipnb.methods.tm",
    "evaluate": "kipnb.evaluate",
    "loop": "kipnb.infra.loop",
    "checkpoint": "kipnb.infra.checkpoint",
    "shard": "kipnb.infra.shard",
    "checks": "kipnb.infra.checks",
    "run": "kipnb.run",
    "viz": "kipnb.infra.viz",
    "results": "kipnb.infra.results",
    "colab": "kipnb.infra.colab",
    "repro": "kipnb.repro",
    "course": "kipnb.course",
}

MODULES = tuple(LOCATIONS)


class _ShortNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``kipnb.<short>`` to the module at ``LOCATIONS[short]`` (one object)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, short = fullname.partition(".")
        if prefix != "kipnb" or LOCATIONS.get(short, fullname) == fullname:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(LOCATIONS[spec.name.partition(".")[2]])
        module.__dict__.setdefault("__real_spec__", module.__spec__)
        return module

    def exec_module(self, module):
        # The import system has just set ``module.__spec__`` to the short name's spec; give
        # the module back its own (reload, pickling by spec and debuggers use it).
        module.__spec__ = module.__dict__.get("__real_spec__", module.__spec__)


if not any(isinstance(f, _ShortNames) for f in sys.meta_path):
    sys.meta_path.insert(0, _ShortNames())

from kipnb.distilled import DistilledSet  # noqa: E402

__all__ = ["DistilledSet", "LOCATIONS", "__version__", *MODULES]


def __getattr__(name):
    if name in LOCATIONS:
        return importlib.import_module(LOCATIONS[name])
    raise AttributeError(f"module 'kipnb' has no attribute {name!r}")
