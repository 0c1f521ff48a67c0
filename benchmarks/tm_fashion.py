"""MTT and DATM (notebooks 06 and 07): a thin wrapper over ``repro/tm_fashion.yaml``.

    python benchmarks/tm_fashion.py [--rows NAME ...] [--profile cpu|accelerator] [-o DIR]

is ``python -m kipnb.run --repro tm_fashion ...``: the spec's rows run the notebook through
papermill (the one implementation of the experiment), runs with the same parameters and
code version are reused, and the table lands in ``results/tm_fashion.{json,md}``. The JSON
files this script wrote before the suite existed stay in ``benchmarks/results/`` as
history. See :mod:`kipnb.repro` and README "Reproducing the papers".
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kipnb import repro  # noqa: E402

if __name__ == "__main__":
    sys.exit(repro.main(["run", "tm_fashion", *sys.argv[1:]]))
