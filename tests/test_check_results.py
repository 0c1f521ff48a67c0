"""scripts/check_results.py: CI's check of make run's headline figures against floors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_results", ROOT / "scripts" / "check_results.py")
cr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cr)


def make_run(tmp_path, results: dict, ok=True):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    runs = []
    for name, res in results.items():
        (nbs / f"{name}.ipynb").write_text("{}")
        (tmp_path / "run" / name).mkdir(parents=True)
        (tmp_path / "run" / name / "results.json").write_text(json.dumps(res))
        runs.append({"notebook": f"notebooks/{name}.ipynb", "ok": ok, "error": None if ok else
                     "cell 3 raised ValueError: boom", "seconds": 12.0})
    (tmp_path / "run" / "summary.json").write_text(json.dumps(runs))
    return tmp_path / "run", nbs


RES = {"02_ls": {"rows": [{"ipc": 1, "acc": 0.5}, {"ipc": 10, "acc": 0.8}]},
       "03_kip": {"final": {"acc": 0.9}}}


def test_lookup_paths():
    assert cr.lookup(RES["02_ls"], "rows[ipc=10].acc") == 0.8
    assert cr.lookup(RES["03_kip"], "final.acc") == 0.9
    assert cr.lookup({"r": [{"a": 1, "b": "x", "v": 2}, {"a": 1, "b": "y", "v": 3}]},
                     "r[a=1,b=y].v") == 3
    with pytest.raises(KeyError, match="0 elements"):
        cr.lookup(RES["02_ls"], "rows[ipc=50].acc")
    with pytest.raises(KeyError, match="'nope' not found"):
        cr.lookup(RES["03_kip"], "final.nope")


def test_passes_and_fails_on_floors(tmp_path):
    run, nbs = make_run(tmp_path, RES)
    floors = {"02_ls": {"rows[ipc=10].acc": 0.7}, "03_kip": {"final.acc": 0.85}}
    assert cr.check(run, floors, nbs) == []
    floors["03_kip"]["final.acc"] = 0.95
    assert cr.check(run, floors, nbs) == ["03_kip: final.acc = 0.9000 is below its floor 0.95"]


def test_missing_floor_failed_or_unrun_notebook_is_an_error(tmp_path):
    run, nbs = make_run(tmp_path, RES, ok=False)
    probs = cr.check(run, {"02_ls": {"rows[ipc=1].acc": 0.1}}, nbs)
    assert probs == ["02_ls: FAILED: cell 3 raised ValueError: boom",
                     "03_kip: FAILED: cell 3 raised ValueError: boom"]
    (nbs / "04_new.ipynb").write_text("{}")
    probs = cr.check(run, {"09_gone": {"x": 1}}, nbs)
    assert "04_new: not run" in probs and "floors name '09_gone', which is not a notebook" in probs


def test_floors_file_covers_every_notebook():
    floors = yaml.safe_load((ROOT / ".ci" / "floors.yaml").read_text())
    names = {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb")}
    assert set(floors) == names
    assert all(floors[n] for n in names)
