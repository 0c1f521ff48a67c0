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

(or set ``KIPNB_NT_PYTHON`` to that Python instead of passing ``--nt-python``).

Ratios between two libraries on a shared, virtualised 2-core machine move by up to 2x
from one run to the next. ``--rounds N`` runs kipnb, then neural-tangents and kipnb
again, N times over, and reports for every row the ratio of each round (neural-tangents'
run against the kipnb runs on either side of it) with their min and max
(``*_rounds``, ``*_min``, ``*_max``, ``*_median_of_rounds`` in the JSON), beside the
pooled ratio of all timed calls.

The *colab* suite (``--suites colab``, on by default) times the settings of Google
Research's ``kip/KIP.ipynb`` colab (FC-1 NTK with ``W_std = sqrt(2)``, ``b_std = 0.1``,
``KERNEL_FN = jax.jit(partial(kernel_fn, get='ntk'))``) in float32 and float64, on
deterministic random 28x28x1 inputs generated inside each worker from the same seed:

* ``FC-1 KIP step``: ``jax.value_and_grad`` of the colab's loss (``kernel_fn(x_s, x_s)``,
  ``solve(..., assume_a='pos')``, ``reg = 1e-6``) w.r.t. the 100 support images, 5000
  targets; its first call (tracing + compilation + one step) is the *first call* column,
  and two extra rows time a fresh copy's ``jax.jit(...).lower(...)`` (tracing and
  lowering to StableHLO) and ``.compile()`` (XLA) separately (one call each);
* ``FC-1 K_ts forward``: ``KERNEL_FN(x_t, x_s)``, 5000 x 100;
* ``FC-1 Label Solve``: 100 support images, 10000 and 60000 targets in blocks of 1000
  (kipnb: ``kipnb.krr.label_solve``; neural-tangents: the same normal-equation
  algorithm written out in this script with its ``kernel_fn``); one call is the whole
  solve, its first call includes compilation;
* ``Conv KIP step``: the colab's 'Conv' option at depth 3 (three ``Conv(1024, (3, 3),
  'SAME') -> Relu``, ``Flatten``, ``Dense``; no pooling), 10 support x 100 targets;
* ``Myrtle-5 gradient``: the colab's Myrtle-5 (GlobalAvgPool), gradient of
  ``sum(ntk(x1, x2))`` w.r.t. ``x1``, 2 x 4 pairs.

The Conv and Myrtle rows are small (a couple of timed calls) to keep the run short.

The worker mode (``--worker``) is internal: it is how the script runs itself under the
other Python, and it imports only the library it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
    for arch in settings.get("archs", ARCHS):
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


COLAB_DTYPES = ("float32", "float64")


def colab_net(stax, arch: str):
    """The colab's networks (``get_kernel_fn``: FC depth 1, Conv depth 3, Myrtle-5)."""
    W, b = np.sqrt(2), 0.1
    if arch == "FC-1":
        return stax.serial(stax.Flatten(), stax.Dense(1024, W_std=W, b_std=b), stax.Relu(),
                           stax.Dense(10, W_std=W, b_std=b))
    conv = [stax.Conv(1024, (3, 3), W_std=W, b_std=b, padding="SAME"), stax.Relu()]
    if arch == "Conv":
        return stax.serial(*(conv * 3), stax.Flatten(), stax.Dense(10, W_std=W, b_std=b))
    if arch == "Myrtle-5":
        pool = [stax.AvgPool((2, 2), strides=(2, 2))]
        return stax.serial(*conv, *conv, *pool, *conv, *pool, *conv, stax.GlobalAvgPool(),
                           stax.Dense(10, W_std=W, b_std=b))
    raise ValueError(arch)


def _jit_static_kernel(fn):
    import jax

    return jax.jit(fn, static_argnames=("kernel_fn",))


def port_label_solve(kernel_fn, x_s, x_t, y_t, reg=1e-6, solve_reg=1e-6, block=1000):
    """Label Solve by blocked normal equations (what ``kipnb.krr.label_solve`` computes).

    ``kernel_fn(x1, x2)`` returns the NTK; its jitted blocks are cached per ``kernel_fn``
    (a hashable object), so only the first call compiles.
    """
    import jax.numpy as jnp

    global _PORT
    if _PORT is None:
        from jax.scipy.linalg import cho_factor, cho_solve

        @_jit_static_kernel
        def factor(x_s, kernel_fn):
            k_ss = kernel_fn(x_s, x_s)
            n = k_ss.shape[0]
            return cho_factor(k_ss + reg * jnp.trace(k_ss) / n * jnp.eye(n, dtype=k_ss.dtype),
                              lower=True)[0]

        @_jit_static_kernel
        def acc(gram, rhs, low, x_s, xb, yb, kernel_fn):
            a = cho_solve((low, True), kernel_fn(xb, x_s).T).T
            return gram + a.T @ a, rhs + a.T @ yb

        _PORT = factor, acc
    factor, acc = _PORT
    low = factor(x_s, kernel_fn=kernel_fn)
    n = low.shape[0]
    gram = jnp.zeros((n, n), low.dtype)
    rhs = jnp.zeros((n, y_t.shape[1]), low.dtype)
    for start in range(0, x_t.shape[0], block):
        gram, rhs = acc(gram, rhs, low, x_s, x_t[start:start + block],
                        y_t[start:start + block], kernel_fn=kernel_fn)
    mu = solve_reg * jnp.trace(gram) / n
    return jnp.linalg.solve(gram + mu * jnp.eye(n, dtype=gram.dtype), rhs)


_PORT = None


def measure_colab(library: str, settings: dict) -> list[dict]:
    """The colab-setting rows (see the module docstring), float32 and float64."""
    import functools

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax import scipy as sp

    if library == "kipnb":
        from kipnb import krr, stax
    else:
        from neural_tangents import stax

    rows = []
    n_s, n_t = settings["colab_support"], settings["colab_targets"]
    rng = np.random.default_rng(1)
    base = {"xs": rng.standard_normal((n_s, 28, 28, 1)),
            "xt": rng.standard_normal((max(settings["label_solve_targets"]), 28, 28, 1)),
            "ys": np.eye(10)[np.arange(n_s) % 10] - 0.1}
    base["yt"] = np.eye(10)[rng.integers(0, 10, base["xt"].shape[0])] - 0.1

    def timed(case, dtype, fn, args, calls, pairs=None):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        first = time.perf_counter() - t0
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        rows.append({"case": case, "dtype": dtype, "first_call_s": first,
                     "median_s": statistics.median(times), "times_s": times,
                     "timed_calls": len(times), "pairs": pairs})
        print(f"  [{library}] {case:34s} {dtype}  median {statistics.median(times):8.3f} s"
              f"  first call {first:6.2f} s", flush=True)
        return out

    for dtype in COLAB_DTYPES:
        dt = jnp.float64 if dtype == "float64" else jnp.float32
        arr = {k: jnp.asarray(v, dt) for k, v in base.items()}
        xs, ys = arr["xs"], arr["ys"]
        xt, yt = arr["xt"][:n_t], arr["yt"][:n_t]
        _, _, kfn = colab_net(stax, "FC-1")
        kernel = jax.jit(functools.partial(kfn, get="ntk"))

        def loss(x_support, y_support, x_target, y_target, kernel=kernel, reg=1e-6):
            k_ss = kernel(x_support, x_support)
            k_ts = kernel(x_target, x_support)
            n = k_ss.shape[0]
            k_reg = k_ss + jnp.abs(reg) * jnp.trace(k_ss) * jnp.eye(n) / n
            pred = jnp.dot(k_ts, sp.linalg.solve(k_reg, y_support, assume_a="pos"))
            return 0.5 * jnp.mean((pred - y_target) ** 2)

        # Compile time on its own: tracing + lowering, then XLA compilation (a fresh jit,
        # so the timed step below still measures its own first call).
        t0 = time.perf_counter()
        lowered = jax.jit(jax.value_and_grad(loss)).lower(xs, ys, xt, yt)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        rows.append({"case": "FC-1 KIP step: trace + lower", "dtype": dtype,
                     "first_call_s": t1 - t0, "median_s": t1 - t0, "times_s": [t1 - t0],
                     "timed_calls": 1, "pairs": None})
        rows.append({"case": "FC-1 KIP step: XLA compile", "dtype": dtype,
                     "first_call_s": t2 - t1, "median_s": t2 - t1, "times_s": [t2 - t1],
                     "timed_calls": 1, "pairs": None})
        print(f"  [{library}] FC-1 KIP step trace+lower {t1 - t0:.2f} s, compile "
              f"{t2 - t1:.2f} s ({dtype})", flush=True)
        step = jax.jit(jax.value_and_grad(loss))
        timed(f"FC-1 KIP step {n_s}x{n_t}", dtype, step, (xs, ys, xt, yt),
              settings["colab_calls"], n_s * n_t)
        timed(f"FC-1 K_ts forward {n_t}x{n_s}", dtype, kernel, (xt, xs),
              settings["colab_calls"], n_s * n_t)
        for n_ls in settings["label_solve_targets"]:
            _, _, kfn_ls = colab_net(stax, "FC-1")  # fresh: the first call compiles
            k_ls = functools.partial(kfn_ls, get="ntk")
            x_ls, y_ls = arr["xt"][:n_ls], arr["yt"][:n_ls]
            if library == "kipnb":
                solve = functools.partial(krr.label_solve, kfn_ls, reg=1e-6, solve_reg=1e-6)
            else:
                solve = functools.partial(port_label_solve, k_ls)
            timed(f"FC-1 Label Solve {n_s}x{n_ls}", dtype, solve, (xs, x_ls, y_ls), 2,
                  n_s * n_ls)
        _, _, kconv = colab_net(stax, "Conv")
        kc = jax.jit(functools.partial(kconv, get="ntk"))
        cs, ct = arr["xs"][:settings["conv_support"]], arr["xt"][:settings["conv_targets"]]
        cys, cyt = arr["ys"][:cs.shape[0]], arr["yt"][:ct.shape[0]]
        cstep = jax.jit(jax.value_and_grad(functools.partial(loss, kernel=kc)))
        timed(f"Conv KIP step {cs.shape[0]}x{ct.shape[0]}", dtype,
              cstep, (cs, cys, ct, cyt), 2, cs.shape[0] * ct.shape[0])
        _, _, kmyr = colab_net(stax, "Myrtle-5")
        m1, m2 = arr["xs"][:settings["myrtle_n1"]], arr["xt"][:settings["myrtle_n2"]]
        mgrad = jax.jit(jax.value_and_grad(lambda a, b, k=kmyr: jnp.sum(k(a, b, "ntk"))))
        timed(f"Myrtle-5 gradient {m1.shape[0]}x{m2.shape[0]}", dtype, mgrad, (m1, m2), 2,
              m1.shape[0] * m2.shape[0])
    return rows


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
    rows, values, colab = [], {}, []
    if "throughput" in settings["suites"]:
        rows, values = measure_all(args.worker, arrays, settings)
    if "colab" in settings["suites"]:
        colab = measure_colab(args.worker, settings)
    Path(args.result).write_text(json.dumps({"rows": rows, "colab_rows": colab,
                                             "info": library_info(args.worker)}))
    np.savez(args.values, **values)


def round_ratios(per_run: dict, suite: str, key) -> list[float]:
    """One ratio (neural-tangents' median time / kipnb's) per interleaved round.

    Round ``i`` pairs neural-tangents' ``i``-th run with the kipnb runs just before and
    after it (their timed calls pooled), so a drift in machine speed during the round
    affects both sides alike.
    """
    ratios = []
    for i, nt_run in enumerate(per_run.get("nt", [])):
        kipnb_times = per_run["kipnb"][i][suite][key] + per_run["kipnb"][i + 1][suite][key]
        ratios.append(statistics.median(nt_run[suite][key]) / statistics.median(kipnb_times))
    return ratios


def add_rounds(row: dict, name: str, ratios: list[float]) -> None:
    """Store the per-round ratios of ``row[name]`` and their min, median and max."""
    row[f"{name}_rounds"] = ratios
    row[f"{name}_min"], row[f"{name}_max"] = min(ratios), max(ratios)
    row[f"{name}_median_of_rounds"] = statistics.median(ratios)


def rel_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return diff, diff / float(np.max(np.abs(b)))


def _fmt_s(t: float) -> str:
    return f"{t:.3f}" if t < 1 else f"{t:.2f}"


def colab_markdown(report: dict) -> str:
    """The colab rows of a ``report`` (this script's JSON) as a Markdown table.

    One row per setting and dtype: both libraries' median seconds per call, the speed-up
    (neural-tangents' time / kipnb's; above 1: kipnb faster) with each round's min-max
    when the run had several ``--rounds``, and the first calls (trace + compile + one call)
    with their ratio. Rows where kipnb is slower have their speed-up in bold.

    Args:
      report: the dict this script writes with ``--out`` (needs neural-tangents' rows).

    Returns:
      The table, with a first line naming the run (commit, date, rounds, wall time).

    Example:
      >>> import json
      >>> print(colab_markdown(json.load(open("results.json"))))  # doctest: +SKIP
    """
    rows = [r for r in report["colab_results"] if "nt" in r]
    if not rows:
        raise ValueError("colab_markdown: the report has no neural-tangents rows (run with "
                         "--nt-python)")
    rounds = report["settings"].get("rounds", 1)
    head = (f"Run of {report['created'][:10]} at {str(report['commit'])[:8]}, {rounds} "
            f"round{'s' if rounds > 1 else ''}, {report['wall_time_s']:.0f} s, "
            f"{report['machine'].get('cpu_count')} CPUs, JAX {report['kipnb'].get('jax')} "
            f"(neural-tangents on JAX {(report['neural_tangents'] or {}).get('jax')}):\n\n")
    spread = rounds > 1
    lines = ["| colab setting | dtype | kipnb s | NT s | speed-up"
             + (" (rounds min-max)" if spread else "")
             + " | first call kipnb / NT s | first-call speed-up |",
             "|---|---|---|---|---|---|---|"]

    def bold(x):
        return f"**{x:.2f}×**" if x < 1 else f"{x:.2f}×"

    for r in rows:
        k, n = r["kipnb"], r["nt"]
        one_call = r["case"].startswith("FC-1 KIP step:")  # trace/compile: a single call
        sp = bold(r["speedup_kipnb_over_nt"])
        if spread and "speedup_kipnb_over_nt_min" in r:
            sp += f" ({r['speedup_kipnb_over_nt_min']:.2f}-{r['speedup_kipnb_over_nt_max']:.2f})"
        first = "–" if one_call else f"{_fmt_s(k['first_call_s'])} / {_fmt_s(n['first_call_s'])}"
        fsp = "–" if one_call else bold(r["first_call_speedup_kipnb_over_nt"])
        lines.append(f"| {r['case']} | {r['dtype']} | {_fmt_s(k['median_s'])} | "
                     f"{_fmt_s(n['median_s'])} | {sp} | {first} | {fsp} |")
    return head + "\n".join(lines)


def throughput_markdown(report: dict) -> str:
    """The throughput rows of a ``report`` (FC-3, ConvNet-3 pairs per second) as Markdown.

    Args:
      report: the dict this script writes with ``--out`` (needs neural-tangents' rows).

    Returns:
      One row per architecture, input and mode: both libraries' NTK pairs per second, their
      ratio (with each round's min-max when the run had several ``--rounds``) and the
      largest relative difference of the values (and gradients).

    Example:
      >>> print(throughput_markdown(json.load(open("results.json"))))  # doctest: +SKIP
    """
    rows = [r for r in report["results"] if "nt" in r]
    if not rows:
        raise ValueError("throughput_markdown: the report has no neural-tangents rows (run "
                         "with --nt-python)")
    spread = report["settings"].get("rounds", 1) > 1
    lines = ["| architecture | input | mode | pairs | kipnb / NT (pairs/s) | kipnb / NT"
             + (" (rounds min-max)" if spread else "") + " | max relative difference |",
             "|---|---|---|---|---|---|---|"]

    def rate(x):
        return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x:.3g}"

    for r in rows:
        ratio = r["ratio_kipnb_over_nt"]
        cell = f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.0f}×"
        cell = f"**{cell}**" if ratio < 1 else cell
        if spread and "ratio_kipnb_over_nt_min" in r:
            cell += f" ({r['ratio_kipnb_over_nt_min']:.2f}-{r['ratio_kipnb_over_nt_max']:.2f})"
        diff = max(r["max_rel_diff"], r.get("grad_max_rel_diff", 0.0))
        lines.append(f"| {r['arch']} | {r['input']} | {r['mode']} | {r['n1']} × {r['n2']} | "
                     f"{rate(r['kipnb']['pairs_per_s'])} / {rate(r['nt']['pairs_per_s'])} | "
                     f"{cell} | {diff:.1e} |")
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=False, help="JSON file to write the results to")
    ap.add_argument("--nt-python", default=os.environ.get("KIPNB_NT_PYTHON"),
                    help="python of an environment with neural-tangents 0.6.5 (default: "
                         "$KIPNB_NT_PYTHON; none: kipnb only)")
    ap.add_argument("--conv-n", type=int, default=8, help="images per side for ConvNet-3")
    ap.add_argument("--fc-n", type=int, default=512, help="inputs per side for FC-3")
    ap.add_argument("--repeats", type=int, default=3, help="minimum timed calls per case")
    ap.add_argument("--max-repeats", type=int, default=30)
    ap.add_argument("--min-time", type=float, default=2.0,
                    help="keep timing (up to --max-repeats calls) until this many seconds")
    ap.add_argument("--suites", default="throughput,colab",
                    help="comma-separated: throughput (FC-3/ConvNet-3 pairs/s), colab")
    ap.add_argument("--archs", default=",".join(ARCHS),
                    help="comma-separated architectures of the throughput suite")
    ap.add_argument("--colab-calls", type=int, default=5,
                    help="timed calls of the FC-1 step and forward rows (after the first)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="interleaved rounds: kipnb, then (neural-tangents, kipnb) this many "
                         "times; every ratio is also reported per round, with its spread")
    ap.add_argument("--markdown", default=None,
                    help="also write the tables (colab: seconds, speed-ups, first calls; "
                         "throughput: pairs/s) as Markdown to this file, for the README")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="print the Markdown tables of an earlier run's JSON and exit")
    ap.add_argument("--worker", choices=("kipnb", "nt"), help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--values", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.render:
        report = json.loads(Path(args.render).read_text())
        print(colab_markdown(report) + "\n\n" + throughput_markdown(report))
        return 0
    if not args.out:
        ap.error("--out is required")
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: need at least 1 round")
    if args.nt_python and not shutil.which(args.nt_python):
        ap.error(f"--nt-python {args.nt_python}: no such Python; build the pinned "
                 "neural-tangents environment with `make ntenv` (or leave --nt-python out "
                 "to time kipnb alone)")

    start = time.perf_counter()
    settings = {"conv_n": args.conv_n, "fc_n": args.fc_n, "repeats": args.repeats,
                "max_repeats": args.max_repeats, "min_time_s": args.min_time,
                "suites": args.suites.split(","), "archs": args.archs.split(","),
                "colab_support": 100, "colab_targets": 5000,
                "colab_calls": args.colab_calls, "label_solve_targets": [10000, 60000],
                "rounds": args.rounds,
                "conv_support": 10, "conv_targets": 100, "myrtle_n1": 2, "myrtle_n2": 4}
    arrays = make_inputs(settings)
    results: dict = {}
    per_run: dict[str, list[dict]] = {}  # each worker run's own timed calls, per case
    with tempfile.TemporaryDirectory() as tmp:
        inputs, sfile = Path(tmp, "inputs.npz"), Path(tmp, "settings.json")
        np.savez(inputs, **arrays)
        sfile.write_text(json.dumps(settings))
        runs = [("kipnb", sys.executable)]
        if args.nt_python:
            runs += [("nt", args.nt_python), ("kipnb", sys.executable)] * args.rounds
        for run_index, (library, python) in enumerate(runs):
            print(f"measuring {library} with {python}", flush=True)
            result = Path(tmp, f"{library}{run_index}.json")
            values = Path(tmp, f"{library}{run_index}_values.npz")
            env = dict(os.environ)
            # Cold compiles only: a persistent compilation cache (kipnb.run sets one for
            # notebook kernels; a spec run inherits it) would turn the compile and first
            # call rows into cache loads.
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
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
            per_run.setdefault(library, []).append({
                "colab": {(r["case"], r["dtype"]): list(r["times_s"]) for r in run["colab_rows"]},
                "rows": {(r["arch"], r["input"], r["mode"]): list(r["times_s"])
                         for r in run["rows"]}})
            if library in results:  # second kipnb run: pool the timed calls per case
                for old, new in zip(results[library]["colab_rows"], run["colab_rows"],
                                    strict=True):
                    old["times_s"] += new["times_s"]
                    old["timed_calls"] += new["timed_calls"]
                    old["median_s"] = statistics.median(old["times_s"])
                    old.setdefault("first_call_s_passes", [old["first_call_s"]])
                    old["first_call_s_passes"].append(new["first_call_s"])
                    old["first_call_s"] = statistics.median(old["first_call_s_passes"])
                for old, new in zip(results[library]["rows"], run["rows"], strict=True):
                    old.setdefault("passes_pairs_per_s", [old["pairs_per_s"]])
                    old["passes_pairs_per_s"].append(new["pairs_per_s"])
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
            add_rounds(row, "ratio_kipnb_over_nt", round_ratios(
                per_run, "rows", (krow["arch"], krow["input"], krow["mode"])))
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

    colab_rows = []
    for krow in results["kipnb"]["colab_rows"]:
        row = {"case": krow["case"], "dtype": krow["dtype"],
               "kipnb": {k: krow[k] for k in ("median_s", "first_call_s", "timed_calls")}}
        if "nt" in results:
            nrow = next(r for r in results["nt"]["colab_rows"]
                        if r["case"] == krow["case"] and r["dtype"] == krow["dtype"])
            row["nt"] = {k: nrow[k] for k in ("median_s", "first_call_s", "timed_calls")}
            row["speedup_kipnb_over_nt"] = nrow["median_s"] / krow["median_s"]
            row["first_call_speedup_kipnb_over_nt"] = nrow["first_call_s"] / krow["first_call_s"]
            add_rounds(row, "speedup_kipnb_over_nt",
                       round_ratios(per_run, "colab", (krow["case"], krow["dtype"])))
        colab_rows.append(row)
    spread = args.rounds > 1 and "nt" in results
    if colab_rows:
        print(f"\n{'colab setting':36s} {'dtype':8s} {'kipnb s':>9s} {'nt s':>9s} "
              f"{'nt/kipnb':>8s} {'1st kipnb':>9s} {'1st nt':>7s} {'nt/kipnb':>8s}"
              + (f" {'rounds (min-max)':>17s}" if spread else ""))
        for row in colab_rows:
            line = f"{row['case']:36s} {row['dtype']:8s} {row['kipnb']['median_s']:9.3f}"
            if "nt" in row:
                line += (f" {row['nt']['median_s']:9.3f} {row['speedup_kipnb_over_nt']:8.2f}"
                         f" {row['kipnb']['first_call_s']:9.2f} {row['nt']['first_call_s']:7.2f}"
                         f" {row['first_call_speedup_kipnb_over_nt']:8.2f}")
                if spread:
                    line += (f" {row['speedup_kipnb_over_nt_min']:8.2f}-"
                             f"{row['speedup_kipnb_over_nt_max']:<8.2f}")
            print(line)

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
            if spread:
                line += (f" {row['ratio_kipnb_over_nt_min']:6.1f}-"
                         f"{row['ratio_kipnb_over_nt_max']:<6.1f}")
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
        "colab_results": colab_rows,
        "commit": git_commit(),
        "wall_time_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(
            colab_markdown(report) + "\n\n" + throughput_markdown(report) + "\n")
        print(f"wrote {args.markdown}")
    print(f"\nwrote {out} (wall time {report['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
