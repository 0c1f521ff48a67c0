"""Throughput of infinite-width NTKs: kipnb.stax vs neural-tangents 0.6.5 on this machine.

Measures pairs per second (``n1 * n2 / seconds``) of ``kernel_fn(x1, x2, 'ntk')`` for

* FC-3: three ``Dense(512, W_std=sqrt(2), b_std=0.1) -> Relu`` blocks, then ``Dense(1)``,
  on flattened images;
* ConvNet-3: three ``Conv(128, (3, 3), padding='SAME', W_std=sqrt(2), b_std=0.1) -> Relu
  -> AvgPool((2, 2), (2, 2))`` blocks, then ``Flatten -> Dense(1)``;

on 28x28x1 and 32x32x3 inputs, forward only and forward + gradient w.r.t. ``x1``
(``jax.value_and_grad`` of ``sum(ntk)``). Every function is ``jax.jit``-compiled; the
first call (compilation, warm-up) is excluded; each timed call ends with
``jax.block_until_ready``; the reported time is the median of the timed calls.

With ``--nt-python PATH`` (the Python of an environment with neural-tangents 0.6.5,
see ``scripts/make_nt_fixtures.py``) the same measurements run with neural-tangents in a
subprocess on the same inputs, and the table adds the speed ratio kipnb/nt and the
largest difference between the two libraries' values (kernels, and gradients in the
forward + gradient rows). kipnb is measured before and after neural-tangents (the two
runs' timed calls are pooled) so that a drift in machine speed (shared, virtualised
CPUs) does not favour either library. Usage::

    .venv/bin/python benchmarks/kernel_speed.py --out benchmarks/results/kernel_speed_cpu.json \\
        --nt-python build/ntenv/bin/python

The worker mode (``--worker``) is internal: it is how the script runs itself under the
other Python, and it imports only the library it measures.
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
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ARCHS = ("FC-3", "ConvNet-3")
INPUTS = {"28x28x1": (28, 28, 1), "32x32x3": (32, 32, 3)}
MODES = ("forward", "forward+grad")


def build(stax, arch: str):
    """The network, from either library's ``stax`` module (same API)."""
    w, b = 2.0**0.5, 0.1
    if arch == "FC-3":
        layers = []
        for _ in range(3):
            layers += [stax.Dense(512, W_std=w, b_std=b), stax.Relu()]
        return stax.serial(*layers, stax.Dense(1, W_std=w, b_std=b))
    if arch == "ConvNet-3":
        layers = []
        for _ in range(3):
            layers += [stax.Conv(128, (3, 3), padding="SAME", W_std=w, b_std=b), stax.Relu(),
                       stax.AvgPool((2, 2), (2, 2))]
        return stax.serial(*layers, stax.Flatten(), stax.Dense(1, W_std=w, b_std=b))
    raise ValueError(arch)


def make_inputs(settings: dict) -> dict[str, np.ndarray]:
    """Deterministic float32 inputs for every (arch, input) case."""
    rng = np.random.default_rng(0)
    arrays = {}
    for arch in ARCHS:
        n = settings["conv_n"] if arch == "ConvNet-3" else settings["fc_n"]
        for name, shape in INPUTS.items():
            for tag in ("x1", "x2"):
                x = rng.standard_normal((n, *shape)).astype(np.float32)
                if arch == "FC-3":
                    x = x.reshape(n, -1)
                arrays[f"{arch}/{name}/{tag}"] = x
    return arrays


def measure_all(library: str, arrays: dict, settings: dict) -> tuple[list[dict], dict]:
    """Runs every case with ``library`` ('kipnb' or 'nt'); returns rows and their values."""
    import jax
    import jax.numpy as jnp

    if library == "kipnb":
        from kipnb import stax
    else:
        from neural_tangents import stax

    rows, values = [], {}
    for arch in ARCHS:
        _, _, kernel_fn = build(stax, arch)
        for name in INPUTS:
            x1 = jnp.asarray(arrays[f"{arch}/{name}/x1"])
            x2 = jnp.asarray(arrays[f"{arch}/{name}/x2"])
            for mode in MODES:
                if mode == "forward":
                    fn = jax.jit(lambda a, b, k=kernel_fn: k(a, b, "ntk"))
                else:
                    fn = jax.jit(jax.value_and_grad(
                        lambda a, b, k=kernel_fn: jnp.sum(k(a, b, "ntk"))))
                t0 = time.perf_counter()
                out = jax.block_until_ready(fn(x1, x2))
                compile_s = time.perf_counter() - t0
                times = []
                budget = settings["min_time_s"]
                while (len(times) < settings["repeats"]
                       or (sum(times) < budget and len(times) < settings["max_repeats"])):
                    t0 = time.perf_counter()
                    out = jax.block_until_ready(fn(x1, x2))
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                pairs = x1.shape[0] * x2.shape[0]
                rows.append({
                    "arch": arch, "input": name, "mode": mode, "n1": int(x1.shape[0]),
                    "n2": int(x2.shape[0]), "dtype": str(x1.dtype),
                    "pairs_per_s": pairs / med, "median_s": med, "min_s": min(times),
                    "first_call_s": compile_s, "timed_calls": len(times), "times_s": times,
                })
                key = f"{arch}/{name}/{mode}"
                if mode == "forward":
                    values[key] = np.asarray(out)
                else:
                    values[key + "/value"] = np.asarray(out[0])
                    values[key + "/grad"] = np.asarray(out[1])
                print(f"  [{library}] {arch:9s} {name} {mode:12s} {pairs / med:10.1f} pairs/s "
                      f"(median of {len(times)}, first call {compile_s:.1f} s)", flush=True)
    return rows, values


def library_info(library: str) -> dict:
    import jax

    info = {"python": sys.version.split()[0], "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except ImportError:  # pragma: no cover
        pass
    if library == "nt":
        import neural_tangents

        info["neural_tangents"] = neural_tangents.__version__
    else:
        info["kipnb.stax"] = "this repository"
    return info


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "processor": platform.processor() or model,
            "cpu_model": model, "cpu_count": os.cpu_count(), "machine": platform.machine()}


def worker(args) -> None:
    arrays = dict(np.load(args.inputs))
    settings = json.loads(Path(args.settings).read_text())
    rows, values = measure_all(args.worker, arrays, settings)
    Path(args.result).write_text(json.dumps({"rows": rows, "info": library_info(args.worker)}))
    np.savez(args.values, **values)


def rel_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return diff, diff / float(np.max(np.abs(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=False, help="JSON file to write the results to")
    ap.add_argument("--nt-python", help="python of an environment with neural-tangents 0.6.5")
    ap.add_argument("--conv-n", type=int, default=8, help="images per side for ConvNet-3")
    ap.add_argument("--fc-n", type=int, default=512, help="inputs per side for FC-3")
    ap.add_argument("--repeats", type=int, default=3, help="minimum timed calls per case")
    ap.add_argument("--max-repeats", type=int, default=30)
    ap.add_argument("--min-time", type=float, default=2.0,
                    help="keep timing (up to --max-repeats calls) until this many seconds")
    ap.add_argument("--worker", choices=("kipnb", "nt"), help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--values", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.out:
        ap.error("--out is required")

    start = time.perf_counter()
    settings = {"conv_n": args.conv_n, "fc_n": args.fc_n, "repeats": args.repeats,
                "max_repeats": args.max_repeats, "min_time_s": args.min_time}
    arrays = make_inputs(settings)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs, sfile = Path(tmp, "inputs.npz"), Path(tmp, "settings.json")
        np.savez(inputs, **arrays)
        sfile.write_text(json.dumps(settings))
        runs = [("kipnb", sys.executable)]
        if args.nt_python:
            runs += [("nt", args.nt_python), ("kipnb", sys.executable)]
        for run_index, (library, python) in enumerate(runs):
            print(f"measuring {library} with {python}", flush=True)
            result = Path(tmp, f"{library}{run_index}.json")
            values = Path(tmp, f"{library}{run_index}_values.npz")
            env = dict(os.environ)
            if library == "nt":
                env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
                env.setdefault("CUDA_VISIBLE_DEVICES", "")
            cmd = [python, str(Path(__file__).resolve()), "--worker", library,
                   "--inputs", str(inputs), "--settings", str(sfile), "--result", str(result),
                   "--values", str(values)]
            proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                print(f"{library} worker failed with exit code {proc.returncode}",
                      file=sys.stderr)
                return proc.returncode
            run = json.loads(result.read_text())
            run["values"] = dict(np.load(values))
            if library in results:  # second kipnb run: pool the timed calls per case
                for old, new in zip(results[library]["rows"], run["rows"], strict=True):
                    old["passes_pairs_per_s"] = [old["pairs_per_s"], new["pairs_per_s"]]
                    old["times_s"] += new["times_s"]
                    old["timed_calls"] += new["timed_calls"]
                    old["median_s"] = statistics.median(old["times_s"])
                    old["min_s"] = min(old["times_s"])
                    old["pairs_per_s"] = old["n1"] * old["n2"] / old["median_s"]
            else:
                results[library] = run

    rows = []
    for krow in results["kipnb"]["rows"]:
        row = {k: krow[k] for k in ("arch", "input", "mode", "n1", "n2", "dtype")}
        row["kipnb"] = {k: krow[k] for k in ("pairs_per_s", "median_s", "min_s",
                                             "first_call_s", "timed_calls")}
        if "passes_pairs_per_s" in krow:
            row["kipnb"]["passes_pairs_per_s"] = krow["passes_pairs_per_s"]
        if "nt" in results:
            nrow = next(r for r in results["nt"]["rows"] if all(
                r[k] == krow[k] for k in ("arch", "input", "mode")))
            row["nt"] = {k: nrow[k] for k in ("pairs_per_s", "median_s", "min_s",
                                              "first_call_s", "timed_calls")}
            row["ratio_kipnb_over_nt"] = krow["pairs_per_s"] / nrow["pairs_per_s"]
            key = f"{krow['arch']}/{krow['input']}/{krow['mode']}"
            kv, nv = results["kipnb"]["values"], results["nt"]["values"]
            if krow["mode"] == "forward":
                row["max_abs_diff"], row["max_rel_diff"] = rel_diff(kv[key], nv[key])
            else:
                row["max_abs_diff"], row["max_rel_diff"] = rel_diff(
                    kv[key + "/value"], nv[key + "/value"])
                row["grad_max_abs_diff"], row["grad_max_rel_diff"] = rel_diff(
                    kv[key + "/grad"], nv[key + "/grad"])
        rows.append(row)

    header = f"{'arch':9s} {'input':8s} {'mode':12s} {'n1xn2':>7s} {'kipnb pairs/s':>14s}"
    if "nt" in results:
        header += f" {'nt pairs/s':>11s} {'kipnb/nt':>9s} {'max rel diff':>12s}"
    print("\n" + header)
    for row in rows:
        line = (f"{row['arch']:9s} {row['input']:8s} {row['mode']:12s} "
                f"{row['n1']:>3d}x{row['n2']:<3d} {row['kipnb']['pairs_per_s']:14.1f}")
        if "nt" in row:
            diff = max(row["max_rel_diff"], row.get("grad_max_rel_diff", 0.0))
            line += (f" {row['nt']['pairs_per_s']:11.2f} {row['ratio_kipnb_over_nt']:9.1f}"
                     f" {diff:12.2e}")
        print(line)

    report = {
        "benchmark": "kernel_speed",
        "description": "NTK pairs per second, jit-compiled, warm-up excluded, median of "
                       "timed calls; ratio = kipnb / neural-tangents on the same inputs",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "kipnb": results["kipnb"]["info"],
        "neural_tangents": results["nt"]["info"] if "nt" in results else None,
        "settings": settings,
        "results": rows,
        "wall_time_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out} (wall time {report['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
