"""Check a `make run` output directory against headline-figure floors (CI's last step).

    python scripts/check_results.py build/run .ci/floors.yaml

The floors file maps each notebook to ``{path: floor}``: ``path`` names a number in the
notebook's ``results.json`` by keys separated by dots; ``name[key=value,key2=value2]``
picks the one element of the list ``name`` whose keys equal those values (read as YAML). Every
notebook of the run must have succeeded (``summary.json``), every notebook in
``notebooks/`` must have been run and have at least one floor, and every figure must be at
least its floor. Prints one line per figure; exits 1 on any failure, naming it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
_SELECT = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<conds>[^\]]+)\]$")


def lookup(results: dict, path: str):
    """The value at ``path`` (see the module docstring) in ``results``; KeyError if absent."""
    node = results
    for seg in path.split("."):
        m = _SELECT.match(seg)
        if m:
            want = {}
            for cond in m["conds"].split(","):
                key, _, value = cond.partition("=")
                want[key.strip()] = yaml.safe_load(value)
            items = node[m["name"]]
            hits = [it for it in items
                    if isinstance(it, dict) and all(it.get(k) == v for k, v in want.items())]
            if len(hits) != 1:
                raise KeyError(f"{seg}: {len(hits)} elements of {m['name']!r} match {want}")
            node = hits[0]
        else:
            if not isinstance(node, dict) or seg not in node:
                raise KeyError(f"{seg!r} not found (in {path!r})")
            node = node[seg]
    return node


def check(run_dir: Path, floors: dict, notebook_dir: Path = ROOT / "notebooks") -> list[str]:
    """Problems found (empty: all good); prints a line per checked figure."""
    problems = []
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return [f"{summary_path} is missing: did make run finish?"]
    summary = {Path(r["notebook"]).stem: r for r in json.loads(summary_path.read_text())}
    for nb in sorted(notebook_dir.glob("[0-9][0-9]*_*.ipynb")):
        name = nb.stem
        r = summary.get(name)
        if r is None:
            problems.append(f"{name}: not run")
            continue
        if not r["ok"]:
            problems.append(f"{name}: FAILED: {r['error']}")
            continue
        if not floors.get(name):
            problems.append(f"{name}: no floor in the floors file (add its headline figure)")
            continue
        results = json.loads((run_dir / name / "results.json").read_text())
        for path, floor in floors[name].items():
            try:
                value = float(lookup(results, path))
            except (KeyError, TypeError, ValueError) as e:
                problems.append(f"{name}: {path}: {e}")
                continue
            ok = value >= floor
            print(f"{'ok  ' if ok else 'LOW '} {name:32s} {path:40s} {value:9.4f} >= {floor:<7g}"
                  f" ({r['seconds']:.0f} s)")
            if not ok:
                problems.append(f"{name}: {path} = {value:.4f} is below its floor {floor}")
    for name in floors:
        if not (notebook_dir / f"{name}.ipynb").is_file():
            problems.append(f"floors name {name!r}, which is not a notebook")
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    floors = yaml.safe_load(Path(argv[1]).read_text()) or {}
    problems = check(Path(argv[0]), floors)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
