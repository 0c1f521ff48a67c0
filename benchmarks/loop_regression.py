"""Before/after speed of the shared long-run loop (kipnb.loop): KIP steps/s and TM iterations/s.

Runs the same two settings in subprocesses of an *old* checkout (``--old``, e.g. the
main branch before the loop, with its own virtual environment) and of this one,
interleaved (old, new, old, new, ...), and writes the ratios new/old to JSON:

* KIP: ``kip.run`` on Fashion-MNIST (first ``--n-train`` images), FC-3 NTK, 10 images
  per class, 1000 class-balanced targets per step, no evaluation or checkpoints;
  steps/s of a ``--kip-steps`` run after a 2-step warm-up run (compilation) in the
  same process;
* TM: ``tm.run`` (MTT) on sklearn digits with 2 tiny experts (width 16, depth 2,
  4 epochs), 1 image per class, 10 student steps, ``loop='python'``; iterations/s of a
  ``--tm-iterations`` run after a 2-iteration warm-up.

On a shared machine timings are contended: only the interleaved ratios mean much.
Usage::

    .venv/bin/python benchmarks/loop_regression.py --old /work/main \\
        --out benchmarks/results/loop_regression.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import dataclasses, json, sys, tempfile, time
which = sys.argv[1]
n_train, kip_steps, tm_iters = map(int, sys.argv[2:5])
out = {}
if which == "kip":
    from kipnb import kip
    cfg = kip.KIPConfig(ipc=10, depth=3, target_batch_size=1000, eval_every=0,
                        checkpoint_every=0, steps=2)
    d = kip.prepare(cfg, n_train=n_train)
    kip.run(cfg, d, progress=False)
    t = time.perf_counter()
    kip.run(dataclasses.replace(cfg, steps=kip_steps), d, progress=False)
    out["per_second"] = kip_steps / (time.perf_counter() - t)
else:
    from kipnb import experts, tm
    d = experts.prepare("digits")
    ecfg = experts.ExpertConfig(dataset="digits", width=16, depth=2, num_experts=2, epochs=4,
                                batch_size=64, lr=0.05)
    traj = experts.train_experts(ecfg, d, tempfile.mkdtemp(), progress=False)
    base = dict(ipc=1, syn_steps=10, expert_epochs=1, max_start_epoch=3, lr_img=10.0,
                eval_at_end=False, loop="python", checkpoint_every=0, augment="crop_flip")
    tm.run(tm.TMConfig(iterations=2, **base), d, traj, progress=False)
    t = time.perf_counter()
    tm.run(tm.TMConfig(iterations=tm_iters, **base), d, traj, progress=False)
    out["per_second"] = tm_iters / (time.perf_counter() - t)
print(json.dumps(out))
'''


def _python(checkout: Path) -> str:
    venv = checkout / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _one(checkout: Path, which: str, args) -> float:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(checkout))
    proc = subprocess.run([_python(checkout), "-c", WORKER, which, str(args.n_train),
                           str(args.kip_steps), str(args.tm_iterations)],
                          env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} in {checkout} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["per_second"]


def _commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="the old checkout (read only)")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--kip-steps", type=int, default=30)
    p.add_argument("--tm-iterations", type=int, default=20)
    args = p.parse_args(argv)
    old, new = Path(args.old).resolve(), ROOT
    t_all = time.perf_counter()
    runs: dict = {w: {"old": [], "new": []} for w in ("kip", "tm")}
    for r in range(args.rounds):
        for which in ("kip", "tm"):
            for name, path in (("old", old), ("new", new)):
                v = _one(path, which, args)
                runs[which][name].append(v)
                print(f"round {r}: {which} {name}: {v:.3f}/s", flush=True)
    result = {
        "what": "kip.run steps/s (Fashion FC-3, ipc 10, 1000 targets) and tm.run iterations/s "
                "(MTT, digits), old vs new checkout, interleaved, medians over rounds",
        "settings": vars(args),
        "kip": {k: statistics.median(v) for k, v in runs["kip"].items()},
        "tm": {k: statistics.median(v) for k, v in runs["tm"].items()},
        "runs": runs,
        "old_commit": _commit(old), "new_commit": _commit(new),
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "seconds": time.perf_counter() - t_all,
    }
    for which in ("kip", "tm"):
        result[which]["ratio_new_over_old"] = result[which]["new"] / result[which]["old"]
    try:
        import jax

        result["jax"] = jax.__version__
    except ImportError:
        pass
    print(json.dumps({w: result[w] for w in ("kip", "tm")}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
