"""Scaling of the sharded code path over 1, 2, 4, 8 devices (kipnb.shard).

For each device count a subprocess runs with ``JAX_PLATFORMS=cpu`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (simulated CPU devices; on a real
TPU/GPU host leave ``--simulate`` off to measure the actual devices in one process) and
measures

* the KIP step (:func:`kipnb.kip.update`: loss, gradient and Adam update) with the FC-3
  NTK, 100 support images and 4000 targets of shape 28x28x1, targets split over the
  devices and the support set replicated, as in :func:`kipnb.kip.run`;
* kernel throughput, pairs per second ``n1 * n2 / seconds`` of ``kernel_fn(x1, x2,
  'ntk')`` with ``x1`` split over the devices: FC-3 (28x28x1, 4000 x 100) and a small
  ConvNet-2 of width 32 (16x16x1, 256 x 32);
* memory vs block size: XLA's per-device temporary memory (``memory_analysis()`` of the
  compiled program) of one :func:`kipnb.krr.krr_evaluate` block (FC-3, 100 support) for
  several block sizes.

Times are medians of ``--repeats`` calls after one warm-up (compilation) call, each
ending with ``jax.block_until_ready``. Usage::

    .venv/bin/python benchmarks/scaling.py --out benchmarks/results/scaling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(repeats: int, n_targets: int, n_support: int) -> dict:
    import jax
    import numpy as np

    from kipnb import archs, kip, krr, shard

    m = shard.mesh()
    rng = np.random.default_rng(0)
    out: dict = {"devices": jax.device_count(), "platform": jax.devices()[0].platform}

    # KIP step: FC-3, n_support support images, n_targets targets.
    cfg = kip.KIPConfig(dataset="fashion_mnist", arch="fc", depth=3)
    kfn = kip.kernel_for(cfg, 10)
    support = {
        "images": rng.standard_normal((n_support, 28, 28, 1)).astype(np.float32),
        "labels": np.asarray(krr.one_hot_targets(np.arange(n_support) % 10, 10)),
    }
    state = kip.init(cfg, support=support)  # replicated over the devices
    x_t = rng.standard_normal((n_targets, 28, 28, 1)).astype(np.float32)
    batch = kip.make_batch(cfg, x_t, rng.integers(0, 10, n_targets), 10)  # split over them
    xt = batch.x
    out["kip_step_sharded_devices"] = len(xt.sharding.device_set)
    sec = _time(lambda: kip.update(cfg, state, batch), repeats)
    out["kip_step"] = {"kernel": "fc3-ntk", "n_support": n_support, "n_targets": n_targets,
                       "seconds": sec, "steps_per_second": 1.0 / sec}

    # Kernel throughput.
    out["kernels"] = []
    for name, kf, shape, n1, n2 in (
        ("fc3", archs.fc(depth=3)[2], (28, 28, 1), n_targets, n_support),
        ("conv2-w32", archs.convnet(depth=2, width=32)[2], (16, 16, 1), 256, 32),
    ):
        x1 = shard.shard_batch(rng.standard_normal((n1, *shape)).astype(np.float32), m)
        x2 = shard.replicate(rng.standard_normal((n2, *shape)).astype(np.float32), m)
        f = jax.jit(kf, static_argnums=2)
        sec = _time(lambda f=f, x1=x1, x2=x2: f(x1, x2, "ntk"), repeats)
        out["kernels"].append({"kernel": name, "input": list(shape), "n1": n1, "n2": n2,
                               "seconds": sec, "pairs_per_second": n1 * n2 / sec})

    # Memory of one krr_evaluate block vs block size (compile only).
    x_s = shard.replicate(support["images"], m)
    alpha = shard.replicate(support["labels"], m)
    out["memory_vs_block_size"] = []
    for bs in (256, 1024, 4096):
        bs = shard.pad_to_multiple(bs, m)
        xb = shard.shard_batch(np.zeros((bs, 28, 28, 1), np.float32), m)
        yb = shard.shard_batch(np.zeros((bs, 10), np.float32), m)
        mask = shard.shard_batch(np.ones(bs, np.float32), m)
        compiled = krr.evaluate_block.lower(kfn, "ntk", x_s, alpha, xb, yb, mask).compile()
        mem = compiled.memory_analysis()
        row = {"block_size": bs}
        if mem is not None:
            for key in ("temp_size_in_bytes", "argument_size_in_bytes",
                        "output_size_in_bytes"):
                row[key] = int(getattr(mem, key, -1))
        out["memory_vs_block_size"].append(row)
    return out


def run_simulated(n: int, args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
           "--repeats", str(args.repeats), "--n-targets", str(args.n_targets),
           "--n-support", str(args.n_support)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker with {n} devices failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--devices", default="1,2,4,8", help="simulated device counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-targets", type=int, default=4000)
    p.add_argument("--n-support", type=int, default=100)
    p.add_argument("--plot", help="PNG of the results (with --from: plot an existing JSON)")
    p.add_argument("--from", dest="from_json", help="plot this JSON instead of measuring")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.from_json:
        plot(json.loads(Path(args.from_json).read_text()), args.plot)
        return
    if args.worker:
        print(json.dumps(worker(args.repeats, args.n_targets, args.n_support)))
        return

    from kipnb.results import machine_info, write_json

    rows = []
    for n in (int(s) for s in args.devices.split(",")):
        row = run_simulated(n, args)
        rows.append(row)
        k = {r["kernel"]: r["pairs_per_second"] for r in row["kernels"]}
        print(f"{n} devices: KIP step {row['kip_step']['seconds']:.3f} s, "
              + ", ".join(f"{name} {v:.3g} pairs/s" for name, v in k.items()), flush=True)
    result = {
        "benchmark": "scaling",
        "machine": machine_info(),
        "settings": {"repeats": args.repeats, "n_targets": args.n_targets,
                     "n_support": args.n_support, "dtype": "float32",
                     "simulated_devices": True},
        "results": rows,
        "notes": (
            "Simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) "
            "share the same CPU cores, so no speed-up is expected: this exercises the "
            "sharded code path (targets split over the 'data' mesh axis, support "
            "replicated) and shows its overhead. Real speed-ups need real devices "
            "(TPU cores / GPUs). memory_vs_block_size is XLA's compile-time estimate per "
            "device for one krr_evaluate block (FC-3 NTK, 100 support images)."
        ),
    }
    if args.out:
        print("wrote", write_json(args.out, result))
    else:
        print(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)


def plot(result: dict, path: str | None) -> None:
    """KIP steps/s, kernel pairs/s and memory per device against the number of devices."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    n = [r["devices"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(n, [r["kip_step"]["steps_per_second"] for r in rows], "o-")
    axes[0].set_ylabel("KIP steps / s")
    for name in [k["kernel"] for k in rows[0]["kernels"]]:
        axes[1].plot(n, [next(k["pairs_per_second"] for k in r["kernels"] if k["kernel"] == name)
                         for r in rows], "o-", label=name)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("kernel pairs / s")
    axes[1].legend(fontsize=8)
    for r in rows:
        mem = r["memory_vs_block_size"]
        axes[2].plot([m["block_size"] for m in mem],
                     [m["temp_size_in_bytes"] / 2**20 for m in mem], "o-",
                     label=f"{r['devices']} devices")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("block size (targets)")
    axes[2].set_ylabel("XLA temp memory / device (MiB)")
    axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
    kind = "simulated CPU devices" if result["settings"].get("simulated_devices") else "devices"
    fig.suptitle(f"kipnb scaling ({kind}, {result['machine'].get('cpu_count')} CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print("wrote", path)


if __name__ == "__main__":
    main()
