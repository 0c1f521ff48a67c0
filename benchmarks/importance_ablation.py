"""The {uniform, importance} init x {uniform, importance} batches ablation, LS and KIP-FC.

Tukan, Maalouf, Osadchy 2023, "Dataset Distillation Meets Provable Subset Selection".
One implementation: this script runs ``notebooks/05_importance_sampling.ipynb`` (the
loop over the settings lives there; every setting is one library call, ``kip.run``
from the picked images with or without :class:`kipnb.sampling.ImportanceSampler`, or
Label Solve on them) with papermill (:func:`kipnb.run.run_notebooks`) and the
parameters given here, and writes the notebook's ``results.json`` rows plus a summary
(mean and std over seeds per cell), the settings, the command line, the wall time and
the machine to ``--out``. Usage::

    .venv/bin/python benchmarks/importance_ablation.py --ipcs 1 10 --seeds 3 --steps 300 \\
        --n-test 2000 --out benchmarks/results/importance_ablation.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kipnb import run as nbrun  # noqa: E402
from kipnb.results import machine_info, write_json  # noqa: E402

NOTEBOOK = ROOT / "notebooks" / "05_importance_sampling.ipynb"


def _min_dist(v: str):
    if v.lower() == "auto":
        return "auto"
    if v.lower() == "none":
        return None
    return float(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per cell")
    ap.add_argument("--depth", type=int, default=3, help="FC kernel depth")
    ap.add_argument("--steps", type=int, default=300, help="KIP steps")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--target-batch", type=int, default=2000, help="KIP targets per step")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=2000, help="test images (0: all)")
    ap.add_argument("--ls-targets", type=int, default=10000, help="LS targets (0: all)")
    ap.add_argument("--landmarks", type=int, default=50, help="Nystrom landmarks per class")
    ap.add_argument("--min-dist", type=_min_dist, default="auto", help="auto | none | float")
    ap.add_argument("--refresh-every", type=int, default=20)
    ap.add_argument("--mix", type=float, default=0.2)
    ap.add_argument("--n-train", type=int, default=None, help="training images (default all)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    params = {
        "DATASET": a.dataset, "IPCS": list(a.ipcs), "SEEDS": list(range(a.seeds)),
        "DEPTH": a.depth, "STEPS": a.steps, "LEARNING_RATE": a.lr,
        "TARGET_BATCH": a.target_batch, "EVAL_EVERY": a.eval_every,
        "N_TEST": a.n_test or None, "LS_TARGETS": a.ls_targets or None,
        "LANDMARKS": a.landmarks, "MIN_DIST": a.min_dist, "REFRESH_EVERY": a.refresh_every,
        "MIX": a.mix, "N_TRAIN": a.n_train,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        (run,) = nbrun.run_notebooks([NOTEBOOK], tmp, params=params)
        if not run.ok:
            raise SystemExit(f"notebook 05 failed: {run.error}")
        result = run.results
    out = {
        "benchmark": "importance_ablation",
        "paper": "Tukan, Maalouf, Osadchy 2023, Dataset Distillation Meets Provable Subset "
                 "Selection",
        "command": "python benchmarks/importance_ablation.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "summary": {f"{r['method']} ipc{r['ipc']} init={r['init']} batches={r['batches']}":
                    {"mean": r["mean"], "std": r["std"]} for r in result["rows"]},
        **{k: result[k] for k in ("rows", "picks", "n_test", "sensitivity", "seconds")},
        "wall_seconds": time.perf_counter() - t0,
        "settings": params,
        "machine": machine_info(),
    }
    write_json(a.out, out)
    for k, v in out["summary"].items():
        print(f"{k:45s} {100 * v['mean']:6.2f} +- {100 * v['std']:5.2f}")
    print(f"wall time {out['wall_seconds']:.0f} s -> {a.out}")
    return out


if __name__ == "__main__":
    main()
