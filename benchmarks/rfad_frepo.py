"""RFAD and FRePo on Fashion-MNIST: reproductions under a time budget, and speed side by side.

Reproduction (one method, one setting)::

    python benchmarks/rfad_frepo.py repro --method rfad --ipc 10 --budget 1200 \\
        --out benchmarks/results/rfad_ipc10.json

distills with :func:`kipnb.rfad.run` / :func:`kipnb.frepo.run` (the CPU-sized configs,
``--width`` etc. to vary) in chunks of ``--chunk`` steps until ``--budget`` seconds of
distillation, recording the running test accuracy against time (fixed random ConvNet
features, 2000 test images), then judges the set by

* ``network``: :func:`kipnb.evaluate.network` with MTT's protocol (``'mtt'``): fresh
  ConvNet-3s, SGD, DSA, ``--seeds`` networks (MTT: 5), all 10000 test images,
  ``--eval-epochs`` epochs (MTT: 1000; 300 by default here for CPU time);
* ``krr``: :func:`kipnb.evaluate.krr` with the exact ConvNet kernel
  (``kipnb.archs.convnet``, depth 3, ``--krr-get``) on the first ``--krr-test`` test
  images (a fixed subset: the exact kernel costs ~2 ms per pair on 2 CPU cores).

Published Fashion-MNIST figures (1 / 10 / 50 images per class), in ``PUBLISHED``: as
recalled in the issue (RFAD 78.6 / 87.0 / 88.8; FRePo 75.6 / 86.2 / 89.6), unverified: a
search on 2026-12-02 did not reach the tables of Loo et al. (NeurIPS 2022, arXiv
2210.12067) or Zhou et al. (NeurIPS 2022, arXiv 2206.00719) (the search corpus returns
only each page's opening; its GitHub index holds the abstracts and FRePo's README, not the
papers' text, and no restatement of these figures was found), so neither the values nor
the evaluation network of each table are confirmed; ``published_verified`` in the JSON
says so.

Speed (all four in one process, interleaved in rounds so that machine load hits all)::

    python benchmarks/rfad_frepo.py speed --ipc 1 --rounds 6 \\
        --out benchmarks/results/rfad_frepo_speed_ipc1.json

RFAD, FRePo, KIP with the FC kernel and KIP with the exact ConvNet kernel
(:mod:`kipnb.kip`, ``arch='conv'``) each run ``--chunk`` steps per round, resuming from
their checkpoints; after each round every set is judged by the same proxy (KRR with 8
fixed random ConvNets of width 64 on 1000 test images: an estimate of the ConvNet
NNGP, cheap enough to call often, not timed). Reported: steps per second (after the
first, compiling, round) and the distillation time at which each method first reaches
each ``--target-acc`` on the proxy (several may be given; the first point of each curve
includes the compilation). The JSON holds the machine, the JAX version, the commit
and the wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kipnb import evaluate, frepo, kip, rfad  # noqa: E402
from kipnb.results import machine_info, write_json  # noqa: E402

PUBLISHED = {"rfad": {1: 78.6, 10: 87.0, 50: 88.8}, "frepo": {1: 75.6, 10: 86.2, 50: 89.6}}


def commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def method_config(method: str, ipc: int, a) -> rfad.RFADConfig | frepo.FRePoConfig:
    kw = {"dataset": "fashion_mnist", "ipc": ipc, "eval_every": 0, "checkpoint_every": 0,
          "seed": a.seed}
    if a.width is not None:
        kw["width"] = a.width
    if a.target_batch is not None:
        kw["target_batch_size"] = a.target_batch
    if method == "rfad":
        if a.models is not None:
            kw["n_models"] = a.models
        return rfad.RFADConfig(**kw)
    if a.models is not None:
        kw["pool_size"] = a.models
    return frepo.FRePoConfig(**kw)


class Runner:
    """One method advanced chunk by chunk (resuming from its checkpoint)."""

    def __init__(self, name, config, d, ckpt_dir, judge):
        self.name, self.config, self.d, self.dir, self.judge = name, config, d, ckpt_dir, judge
        self.steps, self.seconds, self.curve, self.chunk_times = 0, 0.0, [], []

    def advance(self, n):
        self.steps += n
        cfg = dataclasses.replace(self.config, steps=self.steps)
        mod = {"rfad": rfad, "frepo": frepo}.get(self.name.split("-")[0], kip)
        res = mod.run(cfg, self.d, checkpoint_dir=self.dir, progress=False)
        before, self.seconds = self.seconds, float(res.history["seconds"])
        self.chunk_times.append(self.seconds - before)
        acc = self.judge(res.distilled)
        self.curve.append({"step": self.steps, "seconds": self.seconds, "acc": acc})
        self.result = res
        return acc


def proxy_judge(d, n_test=1000):
    ecfg = rfad.RFADConfig(dataset=d.dataset, width=64, eval_models=8, eval_test_size=n_test,
                           seed=12345)
    ev = rfad.RandomFeatureEvaluator(ecfg, d)

    def judge(ds):
        x, _ = evaluate.inputs(ds, d)
        y, _ = evaluate.labels_for(ds, "mse")
        return ev({"images": x, "labels": y})

    return judge


def repro(a):
    if a.save_set and not str(a.save_set).endswith(".npz"):  # before, not after, distilling
        raise SystemExit(f"--save-set {a.save_set}: a DistilledSet is saved as a .npz file; "
                         f"give a path ending in .npz, e.g. {a.save_set}.npz")
    t_start = time.perf_counter()
    d = kip.prepare("fashion_mnist")
    cfg = method_config(a.method, a.ipc, a)
    judge = proxy_judge(d, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        r = Runner(a.method, cfg, d, a.checkpoint_dir or tmp, judge)
        while r.seconds < a.budget and r.steps < a.max_steps:
            acc = r.advance(a.chunk)
            print(f"[{a.method} ipc={a.ipc}] step {r.steps} {r.seconds:.0f} s proxy acc "
                  f"{100 * acc:.2f}%", flush=True)
    ds = r.result.distilled
    if a.save_set:
        ds.save(a.save_set, overwrite=True)
    t0 = time.perf_counter()
    krr = evaluate.krr(ds, d, kernel="conv", get=a.krr_get, n_test=a.krr_test, block_size=100)
    t_krr = time.perf_counter() - t0
    net = None
    if a.seeds > 0:
        net = evaluate.network(ds, d, protocol="mtt", num_seeds=a.seeds, epochs=a.eval_epochs)
    out = {
        "benchmark": "rfad_frepo_repro", "method": a.method, "ipc": a.ipc,
        "budget_seconds": a.budget, "steps": r.steps, "distill_seconds": r.seconds,
        "accuracy_vs_time_proxy": r.curve,
        "krr_exact_convnet": {"acc": krr.mean, "n_test": a.krr_test, "get": a.krr_get,
                              "seconds": t_krr},
        "network_mtt": None if net is None else {
            "mean": net.mean, "std": net.std, "accs": net.accs, "epochs": a.eval_epochs,
            "n_test": 10000, "seconds": net.seconds},
        "published": PUBLISHED[a.method].get(a.ipc), "published_verified": False,
        "config": dataclasses.asdict(cfg), "commit": commit(), "machine": machine_info(),
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_json(a.out, out)
    print(f"{a.method} ipc={a.ipc}: {r.steps} steps in {r.seconds:.0f} s; exact ConvNet KRR "
          f"{100 * krr.mean:.2f}% ({a.krr_test} test images)"
          + ("" if net is None else f", MTT protocol {100 * net.mean:.2f} +- {100 * net.std:.2f}%")
          + f" (published {PUBLISHED[a.method].get(a.ipc)}, unverified)")
    return out


def speed(a):
    t_start = time.perf_counter()
    d = kip.prepare("fashion_mnist")
    judge = proxy_judge(d, 1000)
    configs = {
        "rfad": method_config("rfad", a.ipc, a),
        "frepo": method_config("frepo", a.ipc, a),
        "kip-fc": kip.KIPConfig(ipc=a.ipc, arch="fc", eval_every=0, checkpoint_every=0,
                                target_batch_size=1000),
        "kip-conv": kip.KIPConfig(ipc=a.ipc, arch="conv", eval_every=0, checkpoint_every=0,
                                  target_batch_size=a.conv_targets),
    }
    chunks = {"rfad": a.chunk, "frepo": a.chunk, "kip-fc": a.chunk,
              "kip-conv": max(1, a.chunk // a.conv_slowdown)}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {k: Runner(k, c, d, Path(tmp) / k, judge) for k, c in configs.items()}
        for rnd in range(a.rounds):
            for k, r in runners.items():
                acc = r.advance(chunks[k])
                print(f"round {rnd} {k}: step {r.steps}, {r.seconds:.1f} s, proxy {100 * acc:.2f}%",
                      flush=True)
    out = {"benchmark": "rfad_frepo_speed", "ipc": a.ipc, "target_acc": a.target_acc,
           "methods": {}, "commit": commit(), "machine": machine_info()}
    for k, r in runners.items():
        later = r.chunk_times[1:]
        steps_later = r.steps - r.curve[0]["step"]
        sps = steps_later / sum(later) if later and sum(later) > 0 else None
        reach = {f"{t:g}": next((c["seconds"] for c in r.curve if c["acc"] >= t), None)
                 for t in a.target_acc}
        out["methods"][k] = {"steps_per_second": sps, "seconds_to_target": reach,
                             "curve": r.curve, "config": dataclasses.asdict(r.config)}
    base = out["methods"]["kip-conv"]["steps_per_second"]
    for m in out["methods"].values():
        m["speed_vs_kip_conv"] = (m["steps_per_second"] / base
                                  if base and m["steps_per_second"] else None)
    out["wall_seconds"] = time.perf_counter() - t_start
    write_json(a.out, out)
    for k, m in out["methods"].items():
        print(f"{k:9s} {m['steps_per_second'] or float('nan'):8.3f} steps/s "
              f"(x{m['speed_vs_kip_conv'] or float('nan'):.1f} KIP-conv), "
              f"seconds to {m['seconds_to_target']}, final proxy "
              f"{100 * m['curve'][-1]['acc']:.2f}%")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("repro", "speed"):
        p = sub.add_parser(name)
        p.add_argument("--ipc", type=int, default=1)
        p.add_argument("--width", type=int, default=None)
        p.add_argument("--models", type=int, default=None, help="RFAD nets / FRePo pool size")
        p.add_argument("--target-batch", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--chunk", type=int, default=20, help="steps between judgements")
        p.add_argument("--out", required=True)
    p = sub.choices["repro"]
    p.add_argument("--method", choices=["rfad", "frepo"], required=True)
    p.add_argument("--budget", type=float, default=1200.0, help="distillation seconds")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--krr-test", type=int, default=500)
    p.add_argument("--krr-get", choices=["nngp", "ntk"], default="nngp")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--save-set", default=None)
    p = sub.choices["speed"]
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--target-acc", type=float, nargs="+", default=[0.6],
                   help="proxy accuracies to time (each method's first distillation time "
                        "at or above each)")
    p.add_argument("--conv-targets", type=int, default=100, help="KIP-conv targets per step")
    p.add_argument("--conv-slowdown", type=int, default=10,
                   help="KIP-conv runs chunk // this steps per round")
    a = ap.parse_args(argv)
    return repro(a) if a.cmd == "repro" else speed(a)


if __name__ == "__main__":
    main()
