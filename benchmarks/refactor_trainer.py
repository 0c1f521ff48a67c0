"""Before/after the one optax trainer (issue 13): KIP transfer, an expert epoch, MTT's evaluation.

    python benchmarks/refactor_trainer.py --baseline main --rounds 2 \\
        --out benchmarks/results/refactor_trainer.json

Runs the same three settings with the code of ``--baseline`` (a git ref, extracted into a
temporary directory with ``git archive``) and with this checkout, in separate processes,
alternating (baseline, new, baseline, new, ...) so that both see the same machine load,
and writes wall times and accuracies of every run, with the machine, the JAX version and
both commits, to ``--out``:

1. **KIP transfer** (:func:`kipnb.train.transfer`): 10 class-balanced standardized
   Fashion-MNIST images per class (centered one-hot labels), FC-1 of width 1024, Adam,
   ``--transfer-steps`` steps, seeds 0 and 1, the first 2000 test images.
2. **An expert epoch** (:func:`kipnb.experts.train_experts`): one width-32 ConvNet-3
   expert, one epoch of SGD with DSA over the first ``--expert-n-train`` training images
   (batch 256), test accuracy on the first 2000 test images.
3. **MTT's evaluation** (:func:`kipnb.experts.evaluate`): two fresh width-32 ConvNet-3s
   trained on 10 real images per class for ``--eval-epochs`` epochs (SGD momentum 0.9,
   weight decay 5e-4, lr 0.01, DSA).

Accuracies must be equal (same seeds) and the new code must not be slower. The timings
include compilation (each setting runs once per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def side(code: str, a) -> dict:
    """One process's measurements with the kipnb found in ``code``."""
    sys.path.insert(0, code)
    from kipnb import experts

    experts.reuse_host_memory()
    import jax
    import numpy as np

    import kipnb
    from kipnb import data, kip, train

    assert Path(kipnb.__file__).resolve().is_relative_to(Path(code).resolve()), kipnb.__file__
    out = {"code": code}
    # 1. KIP transfer
    kd = kip.prepare("fashion_mnist")
    idx = data.class_balanced_indices(jax.random.PRNGKey(0), kd.labels_train, 10, 10)
    cfg = train.TrainConfig(arch="fc", width=1024, depth=1, steps=a.transfer_steps, seeds=(0, 1))
    t0 = time.perf_counter()
    r = train.transfer((kd.x_train[idx], kd.labels_train[idx]), kd.x_test[:2000],
                       kd.labels_test[:2000], cfg)
    out["transfer"] = {"seconds": time.perf_counter() - t0, "accs": r["accs"],
                       "final_loss": [x["final_loss"] for x in r["runs"]]}
    # 2. one expert epoch
    d = experts.prepare("fashion_mnist", n_train=a.expert_n_train, n_test=2000)
    ecfg = experts.ExpertConfig(num_experts=1, epochs=1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        traj = experts.train_experts(ecfg, d, tmp, progress=False)
        out["expert_epoch"] = {"seconds": time.perf_counter() - t0,
                               "test_accuracy": traj.test_accuracy[0].tolist(),
                               "param_checksum": float(np.abs(traj.params[0, -1]).sum())}
    # 3. MTT's evaluation of 10 real images per class
    idx = data.class_balanced_indices(jax.random.PRNGKey(1), d.y_train, 10, 10)
    net = ecfg.net(d.image_shape, d.num_classes)
    t0 = time.perf_counter()
    res = experts.evaluate(d.x_train[idx], d.y_train[idx], d, net, lr=0.01,
                           config=experts.EvalConfig(epochs=a.eval_epochs, num_seeds=2))
    out["tm_evaluation"] = {"seconds": time.perf_counter() - t0,
                            "accs": list(res.accuracies)}
    return out


def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="main", help="git ref of the code before")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/refactor_trainer.json"))
    ap.add_argument("--transfer-steps", type=int, default=300)
    ap.add_argument("--expert-n-train", type=int, default=10000)
    ap.add_argument("--eval-epochs", type=int, default=50)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        print("RESULT " + json.dumps(side(a.side, a)))
        return 0
    flags = [f"--transfer-steps={a.transfer_steps}", f"--expert-n-train={a.expert_n_train}",
             f"--eval-epochs={a.eval_epochs}"]
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as old:
        subprocess.run(f"git archive {a.baseline} | tar -x -C {old}", shell=True, cwd=ROOT,
                       check=True)
        for r in range(a.rounds):
            for label, code in (("before", old), ("after", str(ROOT))):
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, __file__, f"--side={code}", *flags],
                                   capture_output=True, text=True, cwd=tempfile.gettempdir(),
                                   env={**os.environ, "PYTHONPATH": code})
                if p.returncode:
                    sys.exit(f"{label} run failed:\n{p.stderr[-3000:]}")
                res = json.loads(p.stdout.split("RESULT ", 1)[1])
                res["process_seconds"] = time.perf_counter() - t0
                runs[label].append(res)
                print(f"round {r} {label}: " + ", ".join(
                    f"{k} {res[k]['seconds']:.1f} s" for k in
                    ("transfer", "expert_epoch", "tm_evaluation")), flush=True)

    def summary(key):
        b = [x[key]["seconds"] for x in runs["before"]]
        n = [x[key]["seconds"] for x in runs["after"]]
        acc = "accs" if key != "expert_epoch" else "test_accuracy"
        return {"before_seconds": b, "after_seconds": n,
                "after_over_before": sum(n) / sum(b),
                "accuracies_equal": all(x[key][acc] == runs["before"][0][key][acc]
                                        for x in runs["before"] + runs["after"]),
                "before_accuracy": runs["before"][0][key][acc],
                "after_accuracy": runs["after"][0][key][acc]}

    from kipnb.results import machine_info, write_json

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    result = {
        "benchmark": "refactor_trainer",
        "what": "issue 13: the one optax trainer vs the trainers before, interleaved",
        "settings": {"transfer_steps": a.transfer_steps, "expert_n_train": a.expert_n_train,
                     "eval_epochs": a.eval_epochs, "rounds": a.rounds},
        "baseline": {"ref": a.baseline, "commit": git("rev-parse", a.baseline)},
        "commit": git("rev-parse", "HEAD") + ("+dirty" if dirty else ""),
        "summary": {k: summary(k) for k in ("transfer", "expert_epoch", "tm_evaluation")},
        "runs": runs,
        "machine": machine_info(),
        "note": "wall times on a shared machine; compare only the interleaved ratio",
    }
    write_json(a.out, result)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
