"""Label Solve on Fashion-MNIST (notebook 02): a thin wrapper over ``repro/ls_fashion.yaml``.

    python benchmarks/ls_fashion.py [--rows NAME ...] [--profile cpu|accelerator] [-o DIR]

is ``python -m kipnb.run --repro ls_fashion ...``: the spec's rows run the notebook through
papermill (the one implementation of the experiment), runs with the same parameters and
code version are reused, and the table lands in ``results/ls_fashion.{json,md}``. The JSON
files this script wrote before the suite existed stay in ``benchmarks/results/`` as
history. See :mod:`kipnb.repro` and README "Reproducing the papers".
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kipnb import repro  # noqa: E402

if __name__ == "__main__":
    sys.exit(repro.main(["run", "ls_fashion", *sys.argv[1:]]))
