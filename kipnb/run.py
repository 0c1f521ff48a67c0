"""Execute notebooks headlessly with papermill: ``python -m kipnb.run`` (behind ``make run``).

::

    python -m kipnb.run                              # every notebook, default parameters
    python -m kipnb.run 00 02_label_solve -p IPC 10  # some notebooks, a parameter
    python -m kipnb.run --params-file repro.yaml     # parameters from a YAML/JSON file
    python -m kipnb.run --list                       # notebooks and their parameters
    python -m kipnb.run --repro ls_fashion [--rows NAME ...] [--profile cpu|accelerator]
                                                     # a reproduction spec (kipnb.repro)

Each notebook ``NAME.ipynb`` is executed into ``OUTPUT/NAME.ipynb`` with the parameter
``OUTPUT_DIR`` set to ``OUTPUT/NAME/``, where it writes ``results.json`` and its files
(distilled sets, checkpoints); the runner adds every figure the notebook showed as
``OUTPUT/NAME/figures/cellNN-K.png``. Kernels talk over IPC, not TCP. The runner prints
the time per notebook and a summary, writes ``OUTPUT/summary.json``, and exits non-zero
when a notebook fails, naming the notebook and the failing cell.

Compilation cache: the kernels run with JAX's persistent compilation cache
(:func:`compile_cache_dir`: ``~/.cache/kipnb/jax-compile``, or ``$KIPNB_COMPILE_CACHE``;
``KIPNB_COMPILE_CACHE=off`` turns it off, and a ``JAX_COMPILATION_CACHE_DIR`` already set
is kept), so a notebook run a second time (``make run`` again, every submission of a
graded assignment) loads its XLA programs instead of compiling them again.

Parameters: ``-p NAME VALUE`` (VALUE is read as YAML, so ``10``, ``0.5``, ``true``,
``[1, 10]`` and ``fashion_mnist`` mean what they look like) applies to every notebook
that declares NAME in its ``parameters`` cell. A params file is a mapping: keys that
are notebook names (``02_label_solve``) hold that notebook's parameters, other keys
apply to all. Command-line values win over the file. A parameter that no selected
notebook declares is an error (it is most likely a typo).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "NotebookRun",
    "RunError",
    "compile_cache_dir",
    "export_figures",
    "find_notebooks",
    "ipc_kernel_manager_class",
    "notebook_parameters",
    "run_notebooks",
]


class RunError(RuntimeError):
    """A notebook could not be selected or parameterized."""


def default_notebook_dir() -> Path:
    """``notebooks/`` of the source checkout (or of the current directory)."""
    here = Path(__file__).resolve().parents[1] / "notebooks"
    return here if here.is_dir() else Path.cwd() / "notebooks"


def find_notebooks(selection: Sequence[str] = (), notebook_dir: Path | None = None) -> list[Path]:
    """Notebooks by path, name (``02_label_solve``) or number prefix (``02``); all by default."""
    notebook_dir = Path(notebook_dir or default_notebook_dir())
    available = sorted(notebook_dir.glob("[0-9][0-9]*_*.ipynb"))
    if not selection:
        if not available:
            raise RunError(f"No notebooks found in {notebook_dir}.")
        return available
    chosen = []
    for sel in selection:
        p = Path(sel)
        if p.suffix == ".ipynb" and p.is_file():
            chosen.append(p)
            continue
        hits = [nb for nb in available if nb.stem == sel or nb.stem.split("_", 1)[0] == sel]
        if len(hits) != 1:
            names = ", ".join(nb.stem for nb in available)
            raise RunError(f"No single notebook matches {sel!r}. Available: {names}.")
        chosen.append(hits[0])
    return chosen


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The notebook's ``parameters`` cell as {NAME: default}; RunError if there is none."""
    import papermill

    params = papermill.inspect_notebook(str(path))
    if not params:
        raise RunError(f"{path} has no cell tagged 'parameters' (papermill needs one).")
    return {k: v.get("default") for k, v in params.items()}


def parse_value(text: str) -> Any:
    """A command-line value read as YAML (numbers, booleans, lists, strings)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_params_file(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise RunError(f"{path}: a params file must be a mapping of NAME: value.")
    return dict(data)


@dataclass
class NotebookRun:
    notebook: str
    output_notebook: str
    output_dir: str
    parameters: dict
    ok: bool = False
    seconds: float = 0.0
    error: str | None = None
    results: dict | None = field(default=None)
    figures: int = 0


def _split_params(
    notebooks: Sequence[Path], file_params: Mapping[str, Any], cli_params: Mapping[str, Any]
) -> dict[Path, dict[str, Any]]:
    """Per-notebook parameters, keeping only what each notebook declares."""
    stems = {nb.stem for nb in notebooks}
    global_params = {k: v for k, v in file_params.items() if not _is_notebook_key(k, stems)}
    global_params.update(cli_params)
    declared_any: set[str] = set()
    out = {}
    for nb in notebooks:
        declared = notebook_parameters(nb)
        declared_any |= set(declared)
        own = dict(file_params.get(nb.stem) or {})
        unknown = set(own) - set(declared)
        if unknown:
            raise RunError(
                f"{nb.name} does not declare {sorted(unknown)}; its parameters are "
                f"{sorted(declared)}."
            )
        merged = {k: v for k, v in global_params.items() if k in declared}
        merged.update(own)
        merged.update({k: v for k, v in cli_params.items() if k in declared})
        out[nb] = merged
    unused = set(global_params) - declared_any
    if unused:
        raise RunError(
            f"No selected notebook declares the parameter(s) {sorted(unused)}; "
            f"declared: {sorted(declared_any)}."
        )
    return out


def _is_notebook_key(key: str, stems: set[str]) -> bool:
    return key in stems or (len(key) > 3 and key[:2].isdigit() and key[2] == "_")


def _describe_failure(e: Exception) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(e, PapermillExecutionError):
        first = next((ln for ln in (e.source or "").splitlines() if ln.strip()), "")
        return (
            f"cell {e.cell_index} (execution count {e.exec_count}) raised "
            f"{e.ename}: {e.evalue}\n    in: {first[:120]}"
        )
    return f"{type(e).__name__}: {e}"


COMPILE_CACHE_ENV = "KIPNB_COMPILE_CACHE"
# JAX caches only programs that took at least this long to compile (its default: 1 s).
COMPILE_CACHE_MIN_SECONDS = "0.2"


def compile_cache_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The persistent XLA compilation cache the notebooks' kernels use, or None (off).

    ``$KIPNB_COMPILE_CACHE`` names the directory (``off``, ``0``, ``no`` or empty: no
    cache); unset, it is ``$XDG_CACHE_HOME/kipnb/jax-compile`` (``~/.cache/...``). A
    ``JAX_COMPILATION_CACHE_DIR`` set by the user wins. JAX keys every entry by the
    program, the JAX/XLA versions, the flags and the device, so a stale entry is never
    used, only a matching one.

    Args:
      environ: the environment to read (default ``os.environ``).

    Returns:
      An absolute directory, or None when the cache is turned off.

    Example:
      >>> compile_cache_dir({"KIPNB_COMPILE_CACHE": "off"}) is None
      True
      >>> compile_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/tmp/jc"})
      '/tmp/jc'
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return env["JAX_COMPILATION_CACHE_DIR"]
    chosen = env.get(COMPILE_CACHE_ENV)
    if chosen is not None:
        if chosen.strip().lower() in ("", "0", "off", "no", "false"):
            return None
        return str(Path(chosen).expanduser().resolve())
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base, "kipnb", "jax-compile").resolve())


@contextlib.contextmanager
def _kernel_environment():
    """Point the kernels started inside (they inherit this process's environment) at the
    compilation cache; the environment is restored afterwards."""
    directory = compile_cache_dir()
    changes = {} if directory is None else {
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": os.environ.get(
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", COMPILE_CACHE_MIN_SECONDS),
    }
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ipc_kernel_manager_class():
    """A kernel manager whose kernels talk over IPC (Unix sockets) instead of TCP.

    ipykernel 7 warns "Kernel is running over TCP without encryption" for every kernel
    started on TCP; a headless run on one machine has no use for TCP, and IPC keeps the
    kernel's traffic off the network. The sockets live beside the kernel's connection
    file in Jupyter's runtime directory and are removed when the kernel shuts down.
    Falls back to jupyter_client's default (TCP) where Unix sockets are not available.

    Returns:
        A subclass of ``jupyter_client.manager.AsyncKernelManager``, or ``None`` on Windows.
    """
    if os.name != "posix":
        return None
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            super().__init__(**kwargs)

    return IPCKernelManager


def export_figures(
    executed_notebook: str | os.PathLike, figures_dir: str | os.PathLike
) -> list[Path]:
    """Write every PNG figure shown in an executed notebook to ``figures_dir``.

    Files are named ``cellNN-K.png`` (the code cell's index in the notebook, the figure's
    place among that cell's outputs), so a figure can be found from the notebook and
    the other way round. Earlier exports in ``figures_dir`` are replaced.

    Args:
        executed_notebook: an ``.ipynb`` file with outputs (papermill's output notebook).
        figures_dir: the directory to write into (created if needed).

    Returns:
        The paths written, in notebook order.

    Example:
        >>> export_figures("build/run/03_kip.ipynb", "build/run/03_kip/figures")  # doctest: +SKIP
        [PosixPath('build/run/03_kip/figures/cell06-1.png'), ...]
    """
    import base64

    nb = json.loads(Path(executed_notebook).read_text())
    out_dir = Path(figures_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("cell*-*.png"):
        old.unlink()
    written = []
    for i, cell in enumerate(nb.get("cells", [])):
        k = 0
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png is None:
                continue
            k += 1
            path = out_dir / f"cell{i:02d}-{k}.png"
            path.write_bytes(base64.b64decode("".join(png) if isinstance(png, list) else png))
            written.append(path)
    return written


def run_notebooks(
    notebooks: Sequence[Path],
    output: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    params_file: str | os.PathLike | None = None,
    keep_going: bool = False,
    kernel_name: str | None = None,
    execution_timeout: int | None = None,
    log=print,
) -> list[NotebookRun]:
    """Execute ``notebooks`` in order into ``output``; see the module docstring."""
    import papermill

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    file_params = load_params_file(params_file) if params_file else {}
    per_nb = _split_params(notebooks, file_params, dict(params or {}))
    runs: list[NotebookRun] = []
    km_class = ipc_kernel_manager_class()
    extra = {"kernel_manager_class": km_class} if km_class is not None else {}
    for nb in notebooks:
        out_dir = output / nb.stem
        out_dir.mkdir(parents=True, exist_ok=True)
        p = {**per_nb[nb], "OUTPUT_DIR": str(out_dir.resolve())}
        run = NotebookRun(str(nb), str(output / nb.name), str(out_dir), p)
        shown = ", ".join(f"{k}={v!r}" for k, v in per_nb[nb].items()) or "defaults"
        log(f"[kipnb.run] {nb.name} ({shown}) ...", flush=True)
        results_path = out_dir / "results.json"
        if results_path.exists():
            results_path.unlink()  # a stale result must not pass for a fresh one
        t0 = time.perf_counter()
        try:
            with _kernel_environment():
                papermill.execute_notebook(
                    str(nb),
                    run.output_notebook,
                    parameters=p,
                    kernel_name=kernel_name,
                    cwd=str(nb.parent),
                    progress_bar=False,
                    execution_timeout=execution_timeout,
                    **extra,
                )
            if not results_path.is_file():
                raise RunError(f"the notebook did not write {results_path}")
            run.results = json.loads(results_path.read_text())
            run.figures = len(export_figures(run.output_notebook, out_dir / "figures"))
            run.ok = True
        except Exception as e:  # report every failure with the notebook named
            run.error = _describe_failure(e)
        run.seconds = time.perf_counter() - t0
        runs.append(run)
        if run.ok:
            log(f"[kipnb.run] {nb.name} ok in {run.seconds:.1f} s ({run.figures} figures)",
                flush=True)
        else:
            log(
                f"[kipnb.run] {nb.name} FAILED after {run.seconds:.1f} s: {run.error}\n"
                f"    executed copy with the traceback: {run.output_notebook}",
                flush=True,
            )
            if not keep_going:
                break
    summary = [r.__dict__ for r in runs]
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(runs, len(notebooks), log, output)
    return runs


def _print_summary(runs: Sequence[NotebookRun], total: int, log, output: Path) -> None:
    log("\n[kipnb.run] summary")
    for r in runs:
        sets = len(list(Path(r.output_dir).glob("*.npz")))
        made = f"results.json, {r.figures} figures, {sets} distilled sets" if r.ok else "-"
        log(f"  {'ok    ' if r.ok else 'FAILED'} {r.seconds:8.1f} s  {Path(r.notebook).name:36s}"
            f" {made}")
    skipped = total - len(runs)
    n_ok = sum(r.ok for r in runs)
    log(
        f"  {n_ok} ok, {len(runs) - n_ok} failed"
        + (f", {skipped} not run (use --keep-going)" if skipped else "")
        + f"; {sum(r.seconds for r in runs):.1f} s in all"
    )
    log(f"  executed notebooks: {output}/NAME.ipynb; results.json, figures/*.png and "
        f"distilled sets (*.npz): {output}/NAME/; this summary: {output}/summary.json")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kipnb.run",
        description="Execute kipnb notebooks with papermill.",
        epilog="See the module docstring (python -c 'import kipnb.run; help(kipnb.run)').",
    )
    ap.add_argument("notebooks", nargs="*", help="paths, names or number prefixes; default all")
    ap.add_argument("-o", "--output", default=None,
                    help="output directory (default build/run; build/repro with --repro)")
    ap.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE")
    )
    ap.add_argument("-f", "--params-file", help="YAML/JSON file of parameters")
    ap.add_argument("--notebook-dir", default=None, help="where to look for notebooks")
    ap.add_argument("--keep-going", action="store_true", help="run the rest after a failure")
    ap.add_argument("--kernel", default=None, help="Jupyter kernel name (default: notebook's)")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per cell")
    ap.add_argument("--list", action="store_true", help="list notebooks and parameters")
    ap.add_argument("--repro", nargs="+", metavar="SPEC",
                    help="reproduction specs (repro/NAME.yaml, a name, 'all'); see kipnb.repro")
    ap.add_argument("--rows", nargs="+", default=[], help="with --repro: only these rows")
    ap.add_argument("--profile", choices=("cpu", "accelerator"), default="cpu",
                    help="with --repro: the rows of this hardware class (default cpu)")
    ap.add_argument("--results", default=None,
                    help="with --repro: where SPEC.json and SPEC.md go (default results/)")
    args = ap.parse_args(argv)
    if args.repro:
        from kipnb import repro

        nd_repro = Path(args.notebook_dir) if args.notebook_dir else None
        try:
            return repro.run_cli(args.repro, args.rows, args.profile,
                                 args.output or "build/repro",
                                 results_dir=args.results or repro.RESULTS_DIR,
                                 keep_going=args.keep_going,
                                 notebook_dir=nd_repro,
                                 timeout=args.timeout)
        except repro.SpecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args.output = args.output or "build/run"
    try:
        nd = Path(args.notebook_dir) if args.notebook_dir else None
        notebooks = find_notebooks(args.notebooks, nd)
        if args.list:
            for nb in notebooks:
                print(f"{nb.stem}: {notebook_parameters(nb)}")
            return 0
        params = {name: parse_value(value) for name, value in args.param}
        runs = run_notebooks(
            notebooks,
            args.output,
            params,
            args.params_file,
            keep_going=args.keep_going,
            kernel_name=args.kernel,
            execution_timeout=args.timeout,
        )
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if runs and all(r.ok for r in runs) and len(runs) == len(notebooks) else 1


if __name__ == "__main__":
    sys.exit(main())
