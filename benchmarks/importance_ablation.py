"""Importance sampling ablation on Fashion-MNIST: {uniform, importance} init x batches.

    python benchmarks/importance_ablation.py --ipcs 1 10 --seeds 3 --steps 300 \\
        --n-test 2000 --out benchmarks/results/importance_ablation.json

Runs :func:`kipnb.sampling.run_ablation` (Tukan, Maalouf, Osadchy 2023, "Dataset
Distillation Meets Provable Subset Selection"):

* **LS** (Label Solve, FC NTK): the support images picked uniformly (KIP's class-balanced
  draw) or by KRR sensitivity (:func:`kipnb.sampling.krr_sensitivity` +
  :func:`kipnb.sampling.sample_init` with the redundancy filter), labels solved on
  ``--ls-targets`` training images. LS has no batches: only the init varies.
* **KIP** (FC NTK, ``--depth``): the same two inits x uniform (KIP's class-balanced)
  or importance batches (:class:`kipnb.sampling.ImportanceSampler`, KIP's own per-point
  loss, refreshed every ``--refresh-every`` steps, mixed with ``--mix`` uniform,
  unbiased weights).

Every cell is run for ``--seeds`` seeds (0, 1, ...); the JSON holds the per-seed KRR test
accuracies on the first ``--n-test`` test images, their mean and std (ddof=1), the
accuracy-vs-steps curves (mean over seeds), the starting accuracies, the picks, the wall
times, the settings, the command line and the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kipnb import sampling  # noqa: E402
from kipnb.results import machine_info, write_json  # noqa: E402


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
    ap.add_argument("--methods", nargs="+", choices=["ls", "kip"], default=["ls", "kip"])
    ap.add_argument("--depth", type=int, default=3, help="FC kernel depth")
    ap.add_argument("--get", choices=["ntk", "nngp"], default="ntk")
    ap.add_argument("--steps", type=int, default=300, help="KIP steps")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--target-batch", type=int, default=2000, help="KIP targets per step")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=2000, help="test images (0: all)")
    ap.add_argument("--ls-targets", type=int, default=10000, help="LS targets (0: all)")
    ap.add_argument("--reg", type=float, default=1e-6)
    ap.add_argument("--landmarks", type=int, default=50, help="Nystrom landmarks per class")
    ap.add_argument("--min-dist", type=_min_dist, default="auto", help="auto | none | float")
    ap.add_argument("--refresh-every", type=int, default=20)
    ap.add_argument("--mix", type=float, default=0.2)
    ap.add_argument("--pool-size", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None, help="training images (default all)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    cfg = sampling.AblationConfig(
        dataset=a.dataset, ipcs=tuple(a.ipcs), seeds=tuple(range(a.seeds)),
        methods=tuple(a.methods), depth=a.depth, get=a.get, steps=a.steps,
        learning_rate=a.lr, target_batch_size=a.target_batch, eval_every=a.eval_every,
        n_test=a.n_test or None, ls_targets=a.ls_targets or None, reg=a.reg,
        landmarks_per_class=a.landmarks, min_dist=a.min_dist, refresh_every=a.refresh_every,
        mix=a.mix, pool_size=a.pool_size, n_train=a.n_train,
    )
    t0 = time.perf_counter()
    result = sampling.run_ablation(cfg, log=lambda s: print(s, flush=True))
    table = sampling.ablation_table(result)
    out = {
        "benchmark": "importance_ablation",
        "paper": "Tukan, Maalouf, Osadchy 2023, Dataset Distillation Meets Provable Subset "
                 "Selection",
        "command": "python benchmarks/importance_ablation.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "summary": {f"{r['method']} ipc{r['ipc']} init={r['init']} batches={r['batches']}":
                    {"mean": r["mean"], "std": r["std"]} for r in result["rows"]},
        **{k: v for k, v in result.items() if k != "config"},
        "wall_seconds": time.perf_counter() - t0,
        "settings": dataclasses.asdict(cfg),
        "machine": machine_info(),
    }
    write_json(a.out, out)
    print(table)
    print(f"wall time {out['wall_seconds']:.0f} s -> {a.out}")
    return out


if __name__ == "__main__":
    main()
