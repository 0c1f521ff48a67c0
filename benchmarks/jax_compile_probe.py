"""How much of the compile-time gap to neural-tangents is the JAX version: one program, two JAXes.

neural-tangents 0.6.5 only imports on JAX 0.4.30; kipnb runs on today's JAX. This script
times the *same* hand-written ``jax.numpy`` program, the FC-1 NTK KIP step of Google
Research's ``kip/KIP.ipynb`` colab written out in closed form (no kipnb, no
neural-tangents), under this Python's JAX and under the JAX of ``--nt-python`` (the pinned
neural-tangents environment, ``make ntenv``), in float32 and float64:

* ``trace_lower_s``: ``jax.jit(jax.value_and_grad(loss)).lower(...)`` (tracing and
  lowering to StableHLO);
* ``compile_s``: ``.compile()`` of that (XLA);
* ``step_s``: the median of timed calls after the first.

Every measurement is a fresh process (no compilation cache), the two JAXes alternate
``--repeats`` times, and the medians are reported with their ratio
(``new_over_old``: above 1, today's JAX takes longer). Usage::

    .venv/bin/python benchmarks/jax_compile_probe.py --nt-python build/ntenv/bin/python \\
        --out benchmarks/results/jax_compile_probe.json
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

SUPPORT, TARGETS, PIXELS, CLASSES = 100, 5000, 784, 10


def worker(dtype: str) -> dict:
    """One measurement in this process (imports only JAX)."""
    import jax
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    jax.config.update("jax_enable_x64", dtype == "float64")
    dt = jnp.dtype(dtype)

    def ntk_fc1(x1, x2, w_var=2.0, b_var=0.01):  # Dense -> Relu -> Dense, NTK, closed form
        d = x1.shape[1]
        n1 = w_var * jnp.sum(x1 * x1, 1) / d + b_var
        n2 = w_var * jnp.sum(x2 * x2, 1) / d + b_var
        k = w_var * x1 @ x2.T / d + b_var
        s = jnp.sqrt(n1[:, None] * n2[None, :])
        c = jnp.clip(k / s, -1.0, 1.0)
        t = jnp.arccos(c)
        nngp = w_var * s * (jnp.sin(t) + (jnp.pi - t) * c) / (2 * jnp.pi) + b_var
        return nngp + k * w_var * (jnp.pi - t) / (2 * jnp.pi)

    def loss(xs, ys, xt, yt):
        kss, kts = ntk_fc1(xs, xs), ntk_fc1(xt, xs)
        reg = 1e-6 * jnp.trace(kss) / kss.shape[0]
        a = jsl.solve(kss + reg * jnp.eye(kss.shape[0], dtype=kss.dtype), ys, assume_a="pos")
        return 0.5 * jnp.mean((kts @ a - yt) ** 2)

    key = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(key)
    xs = jax.random.normal(k1, (SUPPORT, PIXELS), dt)
    xt = jax.random.normal(k2, (TARGETS, PIXELS), dt)
    ys = jax.nn.one_hot(jnp.arange(SUPPORT) % CLASSES, CLASSES, dtype=dt)
    yt = jax.nn.one_hot(jnp.arange(TARGETS) % CLASSES, CLASSES, dtype=dt)
    f = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    lowered = f.lower(xs, ys, xt, yt)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(xs, ys, xt, yt))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(compiled(xs, ys, xt, yt))
        times.append(time.perf_counter() - t)
    return {"jax": jax.__version__, "dtype": dtype, "trace_lower_s": t1 - t0,
            "compile_s": t2 - t1, "step_s": statistics.median(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON file to write")
    ap.add_argument("--nt-python", default=os.environ.get("KIPNB_NT_PYTHON"),
                    help="Python of the pinned neural-tangents environment (make ntenv)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per JAX and dtype")
    ap.add_argument("--worker", choices=("float32", "float64"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    if not args.out or not args.nt_python:
        ap.error("--out and --nt-python are required (build the environment with make ntenv)")
    if not Path(args.nt_python).exists():
        ap.error(f"--nt-python {args.nt_python}: no such Python; build it with make ntenv")
    start = time.perf_counter()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # cold compiles only
    runs: dict = {}
    for dtype in ("float32", "float64"):
        for _ in range(args.repeats):
            for side, python in (("new", sys.executable), ("old", args.nt_python)):
                out = subprocess.run([python, __file__, "--worker", dtype], env=env,
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                runs.setdefault((dtype, side), []).append(r)
                print(f"  {side} JAX {r['jax']:8s} {dtype}: trace+lower "
                      f"{r['trace_lower_s']:.2f} s, compile {r['compile_s']:.2f} s, "
                      f"step {1e3 * r['step_s']:.1f} ms", flush=True)
    rows = []
    for dtype in ("float32", "float64"):
        new, old = runs[dtype, "new"], runs[dtype, "old"]
        row = {"dtype": dtype, "jax_new": new[0]["jax"], "jax_old": old[0]["jax"]}
        for key in ("trace_lower_s", "compile_s", "step_s"):
            a = statistics.median(r[key] for r in new)
            b = statistics.median(r[key] for r in old)
            row[key] = {"new": a, "old": b, "new_over_old": a / b}
        rows.append(row)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kipnb.results import machine_info, write_json

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    write_json(args.out, {
        "benchmark": "jax_compile_probe", "description": __doc__.splitlines()[0],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(), "commit": commit, "repeats": args.repeats,
        "settings": {"support": SUPPORT, "targets": TARGETS, "pixels": PIXELS},
        "results": rows, "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()},
        "wall_time_s": time.perf_counter() - start,
    })
    for r in rows:
        print(f"{r['dtype']}: JAX {r['jax_new']} / {r['jax_old']}: "
              + ", ".join(f"{k} {v['new_over_old']:.2f}x" for k, v in r.items()
                          if isinstance(v, dict)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
