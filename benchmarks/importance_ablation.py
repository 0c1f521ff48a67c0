"""The importance ablation (notebook 05): a thin wrapper over ``repro/importance_ablation.yaml``.

    python benchmarks/importance_ablation.py [--rows NAME ...] [--profile cpu|accelerator] [-o DIR]

is ``python -m kipnb.run --repro importance_ablation ...``: the spec's rows run the notebook through
papermill (the one implementation of the experiment), runs with the same parameters and
code version are reused, and the table lands in ``results/importance_ablation.{json,md}``. The JSON
files this script wrote before the suite existed stay in ``benchmarks/results/`` as
history. See :mod:`kipnb.repro` and README "Reproducing the papers".
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kipnb import repro  # noqa: E402

if __name__ == "__main__":
    sys.exit(repro.main(["run", "importance_ablation", *sys.argv[1:]]))
