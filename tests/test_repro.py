"""The reproduction suite (kipnb.repro): spec checks, reuse and resume, tables, README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from kipnb import repro
from kipnb.run import find_notebooks, notebook_parameters

ROOT = Path(__file__).resolve().parents[1]

GOOD_ROW = """
  - name: a
    notebook: 99_fake
    parameters: {X: 1}
    metric: value
    seeds: [0, 1]
    hardware: cpu
    minutes: 0.1
    published:
      value: 1.0
      source: {paper: P, table: T1, network: N}
      comparable: true
      verified: false
      why: a test
"""


def write_spec(tmp_path, text, name="s"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def test_good_spec_parses(tmp_path):
    spec = repro.load_spec(write_spec(tmp_path, "title: T\nrows:" + GOOD_ROW))
    (row,) = spec.rows
    assert (row.name, row.notebook, row.seeds, row.parameters) == ("a", "99_fake", [0, 1], {"X": 1})
    assert spec.select() == [row] and spec.select(profile="accelerator") == []
    with pytest.raises(repro.SpecError, match=r"no row named \['b'\]"):
        spec.select(["b"])
    verified = GOOD_ROW.replace("      verified: false\n      why: a test\n",
                                "      verified: true\n      where: 'Table 1, row a: 1.0'\n")
    (row,) = repro.load_spec(write_spec(tmp_path, "title: T\nrows:" + verified)).rows
    assert row.published["verified"] and row.published["where"] == "Table 1, row a: 1.0"


@pytest.mark.parametrize(
    "edit, match",
    [
        (("hardware: cpu", "hardware: gpu"), r"row 'a': hardware 'gpu' is not one of"),
        (("    minutes: 0.1\n", ""), r"row 'a': a cpu row states its estimated 'minutes'"),
        (("    metric: value\n", ""), r"row 'a': missing 'metric'"),
        (("seeds: [0, 1]", "seeds: [zero]"), r"'seeds' is a non-empty list of integers"),
        (("      verified: false\n      why: a test\n", "      verified: false\n"),
         r"an unverified published figure says 'why'"),
        (("      verified: false\n      why: a test\n", "      verified: true\n"),
         r"a verified published figure says 'where' \(table and row quoted\)"),
        (("      verified: false\n      why: a test\n", "      verified: true\n      where: [T1]\n"),
         r"published 'where' is a string"),
        (("      source: {paper: P, table: T1, network: N}", "      source: {paper: P}"),
         r"published source needs \['network', 'paper', 'table'\]"),
        (("      comparable: true\n", ""), r"published figure lacks \['comparable'\]"),
        (("    seeds:", "    sedes: [1]\n    seeds:"), r"unknown keys \['sedes'\]"),
        (("    notebook: 99_fake\n", ""), r"give exactly one of 'notebook' and 'script'"),
    ],
)
def test_bad_spec_names_the_problem(tmp_path, edit, match):
    old, new = edit
    assert old in GOOD_ROW
    with pytest.raises(repro.SpecError, match=match):
        repro.load_spec(write_spec(tmp_path, "title: T\nrows:" + GOOD_ROW.replace(old, new)))


def test_bad_spec_files(tmp_path):
    with pytest.raises(repro.SpecError, match="missing 'title'"):
        repro.load_spec(write_spec(tmp_path, "rows:" + GOOD_ROW))
    with pytest.raises(repro.SpecError, match="duplicate row name"):
        repro.load_spec(write_spec(tmp_path, "title: T\nrows:" + GOOD_ROW + GOOD_ROW))
    with pytest.raises(repro.SpecError, match="not valid YAML"):
        repro.load_spec(write_spec(tmp_path, "title: [T\n"))
    with pytest.raises(repro.SpecError, match=r"No spec 'nope': give a path or one of \["):
        repro.find_spec("nope")


def test_project_specs_are_valid_and_fit_two_hours():
    specs = [repro.load_spec(p) for p in sorted(repro.SPEC_DIR.glob("*.yaml"))]
    names = {s.name for s in specs}
    assert {"ls_fashion", "kip_fashion", "kip_transfer", "tm_fashion", "importance_ablation",
            "kernel_speed"} <= names, names
    cpu_minutes = sum(r.minutes for s in specs for r in s.rows if r.hardware == "cpu")
    assert cpu_minutes <= 120, f"make repro's cpu rows are estimated at {cpu_minutes} min"
    declared = {}
    for s in specs:
        assert any(r.hardware == "accelerator" for r in s.rows) or s.name in (
            "importance_ablation", "kernel_speed"), f"{s.name}: no accelerator rows"
        for r in s.rows:
            if r.notebook:  # every parameter is one the notebook declares
                nb = find_notebooks([r.notebook])[0]
                declared.setdefault(nb, set(notebook_parameters(nb)))
                unknown = set(r.parameters) | ({r.seed_parameter} if r.seeds != [None] else set())
                assert unknown <= declared[nb], (s.name, r.name, unknown - declared[nb])


def test_lookup():
    res = {"rows": [{"ipc": 1, "m": "kip", "acc": 0.5}, {"ipc": 10, "m": "kip", "acc": 0.8}],
           "a": {"FC1 net": {"mean": 0.7}}}
    assert repro.lookup(res, "rows[ipc=10,m=kip].acc") == 0.8
    assert repro.lookup(res, "a.FC1 net.mean") == 0.7
    with pytest.raises(KeyError, match="0 elements"):
        repro.lookup(res, "rows[ipc=5].acc")


FAKE_CODE = """
import json, os
os.makedirs(OUTPUT_DIR, exist_ok=True)
with open(os.path.join(COUNTER), "a") as f:
    f.write("x")
assert X != 3, "X must not be 3"
json.dump({"value": X + SEED / 10, "other": {"mean": 0.5, "std": 0.1, "accs": [0.4, 0.6]}},
          open(os.path.join(OUTPUT_DIR, "results.json"), "w"))
"""


@pytest.fixture
def fake(tmp_path):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("X = 1\nSEED = 0\nCOUNTER = ''\nOUTPUT_DIR = 'out'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(FAKE_CODE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nb_dir / "99_fake.ipynb")
    counter = tmp_path / "count.txt"
    counter.write_text("")
    spec_text = f"""title: Fake table
rows:
  - name: a
    notebook: 99_fake
    parameters: {{X: 1, COUNTER: {str(counter)!r}}}
    metric: value
    scale: 100
    seeds: [0, 1]
    hardware: cpu
    minutes: 0.1
    published:
      value: 100.0
      source: {{paper: P, table: T1, network: N}}
      comparable: true
      verified: true
      where: Table 1, row a
  - name: b
    notebook: 99_fake
    parameters: {{X: 1, COUNTER: {str(counter)!r}}}
    metric: other
    scale: 100
    seeds: [0]
    hardware: cpu
    minutes: 0.1
    published: null
  - name: big
    notebook: 99_fake
    parameters: {{X: 5, COUNTER: {str(counter)!r}}}
    metric: value
    seeds: [0]
    hardware: accelerator
    published: null
"""
    return write_spec(tmp_path, spec_text, "fake"), nb_dir, counter


def test_run_reuses_and_resumes(fake, tmp_path):
    spec_path, nb_dir, counter = fake
    out, res_dir = tmp_path / "build", tmp_path / "results"
    kw = dict(output=out, results_dir=res_dir, notebook_dir=nb_dir, log=lambda *a, **k: None)
    doc = repro.run_spec(spec_path, **kw)
    assert counter.read_text() == "xx"  # seeds 0 and 1; row b reads the seed-0 run
    rows = {r["name"]: r for r in doc["rows"]}
    a, b, big = rows["a"], rows["b"], rows["big"]
    assert a["values"] == pytest.approx([100.0, 110.0]) and a["mean"] == pytest.approx(105.0)
    assert a["std"] == pytest.approx(7.0710678) and a["gap"] == pytest.approx(5.0)
    assert a["status"] == "ok" and a["environment"]["jax"]
    assert b["values"] == pytest.approx([40.0, 60.0]) and b["mean"] == pytest.approx(50.0)
    assert b["status"] == "reused"  # the same notebook and parameters as a's seed 0
    assert big["status"] == "not yet run" and big["mean"] is None  # accelerator row: listed
    assert json.loads((res_dir / "fake.json").read_text()) == json.loads(json.dumps(doc))
    md = (res_dir / "fake.md").read_text()
    assert "| a | **105.0** ± 7.1 | 100.0 (P, T1, N) | 5.0 | cpu (~0.1 min) |" in md
    assert "| big | not yet run | – |" in md

    again = repro.run_spec(spec_path, **kw)  # nothing changed: nothing runs
    assert counter.read_text() == "xx"
    assert {r["status"] for r in again["rows"][:2]} == {"reused"}

    # an interrupted suite: seed 1's run never finished (no stamp), so only it runs again
    (stamp,) = [p for p in out.rglob("stamp.json")
                if json.loads(p.read_text())["parameters"].get("SEED") == 1]
    stamp.unlink()
    repro.run_spec(spec_path, rows=["a"], **kw)
    assert counter.read_text() == "xxx"
    # other parameters: another run; rows not run this time keep their earlier results
    spec = repro.load_spec(spec_path)
    spec.rows[0].parameters["X"] = 2
    doc = repro.run_spec(spec, rows=["a"], **kw)
    assert counter.read_text() == "xxxxx"
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["a"]["mean"] == pytest.approx(205.0) and rows["b"]["mean"] == pytest.approx(50.0)

    # refresh: the spec's new published figure reaches results/ without running anything
    spec.rows[0].published = {**spec.rows[0].published, "value": 200.0}
    spec.rows[1].metric = "value"  # another experiment: its old result no longer stands
    doc = repro.refresh_results(spec, res_dir)
    assert counter.read_text() == "xxxxx"
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["a"]["mean"] == pytest.approx(205.0) and rows["a"]["gap"] == pytest.approx(5.0)
    assert rows["a"]["published"]["value"] == 200.0 and rows["b"]["status"] == "not yet run"
    assert "| a | **205.0** ± 7.1 | 200.0 (P, T1, N) | 5.0 |" in (res_dir / "fake.md").read_text()


def test_failed_notebook_is_reported(fake, tmp_path):
    spec_path, nb_dir, _ = fake
    spec = repro.load_spec(spec_path)
    spec.rows[1].metric = "missing.key"
    spec.rows[0].seeds = [0]
    with pytest.raises(RuntimeError, match=r"b: KeyError: .*'missing' not found"):
        repro.run_spec(spec, output=tmp_path / "b", results_dir=tmp_path / "r",
                       notebook_dir=nb_dir, keep_going=True, log=lambda *a, **k: None)
    doc = json.loads((tmp_path / "r" / "fake.json").read_text())
    assert [r["status"] for r in doc["rows"]] == ["ok", "failed", "not yet run"]


def test_rows_sharing_a_failed_run_do_not_retry_it(fake, tmp_path):
    spec_path, nb_dir, counter = fake
    spec = repro.load_spec(spec_path)
    for r in spec.rows[:2]:  # a (seed 0) and b: one run, which fails
        r.parameters["X"] = 3
    spec.rows[0].seeds = [0]
    with pytest.raises(RuntimeError, match=r"b: RuntimeError: b seed 0: the same run as row 'a'"):
        repro.run_spec(spec, output=tmp_path / "b", results_dir=tmp_path / "r",
                       notebook_dir=nb_dir, keep_going=True, log=lambda *a, **k: None)
    assert counter.read_text() == "x"  # tried once, not once per row
    doc = json.loads((tmp_path / "r" / "fake.json").read_text())
    assert [r["status"] for r in doc["rows"]] == ["failed", "failed", "not yet run"]
    assert "X must not be 3" in doc["rows"][0]["error"]


def test_pivot_table_renders_a_matrix(tmp_path):
    def rec(name, metric, mean, hardware="cpu", status="ok"):
        return {"name": name, "metric": metric, "status": status, "mean": mean, "std": 0.5,
                "published": None, "gap": None, "hardware": hardware, "minutes_estimated": 1,
                "wall_seconds": 12.0, "environment": {"jax": "0.1", "commit": "abcdef123"}}
    sel = "records[set={},ipc={},evaluator={}]".format
    doc = {"pivot": {"rows": ["ipc", "set"], "column": "evaluator"}, "rows": [
        rec("a", sel("kip", 1, "krr"), 80.0), rec("b", sel("kip", 1, "net"), 70.0),
        rec("c", sel("ls", 1, "krr"), 60.0), rec("d", sel("ls", 1, "net"), None, status="failed"),
        rec("e", sel("kip", 10, "krr"), 90.0),
        rec("paper", sel("kip", 10, "krr"), 95.0, hardware="accelerator")]}
    md = repro.render_markdown(doc)
    lines = md.splitlines()
    assert lines[:6] == ["| ipc | set | krr | net |", "|---|---|---|---|",
                         "| 1 | kip | 80.0 ± 0.5 | 70.0 ± 0.5 |",
                         "| 1 | ls | 60.0 ± 0.5 | failed |", "| 10 | kip | 90.0 ± 0.5 | – |",
                         ""]
    assert "cpu, one run of 12 s, JAX 0.1, commit abcdef12." in md
    assert "| paper | **95.0** ± 0.5 | – | – | accelerator (~1 min) |" in md  # off the matrix: listed
    assert repro.metric_conditions("a[x=1].b[y=two]") == {"x": 1, "y": "two"}
    with pytest.raises(repro.SpecError, match="'pivot' is"):
        repro.load_spec(write_spec(tmp_path, "title: T\npivot: {rows: ipc}\nrows:" + GOOD_ROW))


def test_update_readme(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    doc = {"rows": [{"name": "r", "status": "ok", "mean": 80.0, "std": 1.0, "values": [79, 81],
                     "published": None, "gap": None, "hardware": "cpu", "minutes_estimated": 1,
                     "wall_seconds": 3.0, "environment": {"jax": "0.1", "commit": "abcdef123"}}]}
    (res / "t.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- repro:t -->\nold table\n<!-- /repro:t -->\nend\n")
    assert repro.update_readme(readme, res, check=True) == ["t"]
    assert "old table" in readme.read_text()  # check only compares
    assert repro.update_readme(readme, res) == ["t"]
    text = readme.read_text()
    assert "| r | **80.0** ± 1.0 | – | – | cpu (~1 min) | 3 s | 0.1 | abcdef12 |" in text
    assert text.startswith("intro\n<!-- repro:t -->\n|") and text.endswith("<!-- /repro:t -->\nend\n")
    assert repro.update_readme(readme, res, check=True) == []
    readme.write_text("<!-- repro:gone -->\n<!-- /repro:gone -->\n")
    with pytest.raises(repro.SpecError, match="results/|gone.json does not exist"):
        repro.update_readme(readme, res)


def test_readme_agrees_with_results():
    """README's generated tables are what results/ says (python -m kipnb.repro readme)."""
    blocks = repro.readme_blocks((ROOT / "README.md").read_text())
    results = sorted(p.stem for p in repro.RESULTS_DIR.glob("*.json"))
    assert results, "results/ holds no spec results"
    assert set(results) <= set(blocks), f"README lacks <!-- repro:NAME --> blocks for {results}"
    stale = repro.update_readme(ROOT / "README.md", repro.RESULTS_DIR, check=True)
    assert not stale, f"README differs from results/ for {stale}: run python -m kipnb.repro readme"


def test_load_sets_judge_all_and_table(tmp_path):
    import numpy as np

    from kipnb import DistilledSet, kip, label_solve

    d = kip.prepare("digits")
    ls = label_solve.solve(d, 1, seed=0, n_targets=300)
    runs = {"a": "02_ls-0123456789abcdef", "b": "04_kip-fedcba9876543210",
            "c": "06_x-1111111111111111", "d": "06_x-2222222222222222"}
    for sub in runs.values():  # a label twice: told apart by notebook, without the run hash
        (tmp_path / "spec" / sub).mkdir(parents=True)
    ls.save(tmp_path / "spec" / runs["a"] / "ls_fc_ipc1.npz")
    ls.save(tmp_path / "spec" / runs["b"] / "ls_fc_ipc1.npz")
    for k in "cd":  # one notebook, two parameter sets: the whole directory
        ls.save(tmp_path / "spec" / runs[k] / "mtt_ipc1.npz")
    (tmp_path / "a").mkdir()
    for ipc in (1, 2):
        idx = np.concatenate([np.flatnonzero(d.labels_train == c)[:ipc] for c in range(10)])
        DistilledSet(d.x_train[idx], d.labels_train[idx], "class", 10, transform=d.transform,
                     source={"ipc": ipc}).save(tmp_path / "a" / f"random_ipc{ipc}.npz")
    np.savez(tmp_path / "a" / "not_a_set.npz", x=np.zeros(3))
    (tmp_path / "a" / "experts").mkdir()
    np.savez(tmp_path / "a" / "experts" / "expert_000.npz", x=np.zeros(3))  # never looked at
    sets, skipped = repro.load_sets(tmp_path)
    assert [(s["label"], s["ipc"]) for s in sets] == [
        ("ls_fc (02_ls)", 1), ("ls_fc (04_kip)", 1), ("mtt (spec/06_x-1111111111111111)", 1),
        ("mtt (spec/06_x-2222222222222222)", 1), ("random", 1), ("random", 2)]
    assert repro.lookup({"r": [{"set": "ls_fc (02_ls)", "ipc": 1, "v": 3}]},
                        "r[set=ls_fc (02_ls),ipc=1].v") == 3  # spec metric paths can name it
    assert [Path(s["path"]).name for s in skipped] == ["not_a_set.npz"]
    assert "not a valid DistilledSet file" in skipped[0]["why"] and "meta" in skipped[0]["why"]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        repro.load_sets(tmp_path / "nope")
    evs = [e for e in repro.default_evaluators(n_test=200) if e["name"] == "krr_fc"]
    recs = repro.judge_all(sets, d, evs, log=None)
    by = {(r["set"], r["ipc"]): r for r in recs}
    assert by[("ls_fc (02_ls)", 1)]["mean"] > by[("random", 1)]["mean"] > 0.3  # chance: 0.1
    table = repro.compare_table(recs)
    assert table.splitlines()[0] == "| images/class | set | krr_fc |"
    top = max((r for r in recs if r["ipc"] == 1), key=lambda r: r["mean"])
    assert f"| 1 | {top['set']} | **{100 * top['mean']:.1f}** |" in table
    assert table.count("**") == 2 * 5  # the best cell per ipc (a tie at 1: the four copies)
    assert len(table.splitlines()) == 2 + 6


def test_repro_out_placeholder_follows_the_output_directory(tmp_path):
    """{repro_out} in parameters becomes the suite's -o directory: the cross-method spec
    finds the other specs' sets wherever the suite writes (it once pointed at build/repro
    only, and failed under -o elsewhere)."""
    import doctest

    spec = repro.load_spec(ROOT / "repro" / "xmethod_fashion.yaml")
    dirs = spec.rows[0].parameters["SETS_DIRS"]
    assert dirs and all(d.startswith("{repro_out}/") for d in dirs), dirs
    params = repro.expand_repro_out(spec.rows[0].parameters, tmp_path / "out")
    assert params["SETS_DIRS"] == [str((tmp_path / "out").resolve() / d.split("/", 1)[1])
                                   for d in dirs]
    assert params["IPCS"] == spec.rows[0].parameters["IPCS"]  # other values untouched
    assert spec.rows[0].parameters["SETS_DIRS"] == dirs  # the spec itself keeps the placeholder
    (test,) = doctest.DocTestFinder().find(repro.expand_repro_out, "expand_repro_out",
                                           globs={"expand_repro_out": repro.expand_repro_out})
    assert doctest.DocTestRunner().run(test).failed == 0


def test_merge_takes_rows_that_ran_elsewhere(fake, tmp_path, monkeypatch):
    spec_path, nb_dir, counter = fake
    log = dict(log=lambda *a, **k: None, notebook_dir=nb_dir)
    home, away = tmp_path / "home", tmp_path / "away"
    repro.run_spec(spec_path, output=tmp_path / "b1", results_dir=home, **log)
    # the other machine: a copy sent with stale git metadata records $KIPNB_COMMIT instead
    monkeypatch.setenv(repro.ENV_COMMIT, "c0ffee")
    assert repro.code_version([repro.ROOT / "kipnb"])["commit"] == "c0ffee"
    repro.run_spec(spec_path, rows=["a", "big"], output=tmp_path / "b2", results_dir=away,
                   **log)
    away_doc = json.loads((away / "fake.json").read_text())
    assert [r["status"] for r in away_doc["rows"]] == ["ok", "not yet run", "ok"]
    assert away_doc["rows"][2]["environment"]["commit"] == "c0ffee"
    assert away_doc["rows"][2]["environment"]["dirty"] is False

    home_a = json.loads((home / "fake.json").read_text())["rows"][0]
    # by default only the accelerator rows come over; home's cpu rows are kept
    assert repro.merge_results(away / "fake.json", home, spec=spec_path) == ["big"]
    rows = {r["name"]: r for r in json.loads((home / "fake.json").read_text())["rows"]}
    assert rows["big"]["status"] == "ok" and rows["big"]["mean"] == pytest.approx(5.0)  # X = 5
    assert rows["big"]["environment"]["commit"] == "c0ffee"
    assert rows["a"] == home_a
    assert "| big | **5.0** |" in (home / "fake.md").read_text()
    # named rows come over whatever their hardware
    assert repro.merge_results(away / "fake.json", home, spec=spec_path, rows=["a"]) == ["a"]
    a = json.loads((home / "fake.json").read_text())["rows"][0]
    assert a["environment"]["commit"] == "c0ffee" and a["mean"] == pytest.approx(105.0)

    # a row whose experiment is no longer the spec's is not taken; nor another spec's rows
    spec = repro.load_spec(spec_path)
    spec.rows[2].parameters["X"] = 6
    assert repro.merge_results(away / "fake.json", tmp_path / "h2", spec=spec) == []
    with pytest.raises(repro.SpecError, match="rows of spec 'other', not of 'fake'"):
        repro.merge_results({**away_doc, "spec": "other"}, home, spec=spec_path)


def test_accelerator_rows_script(fake, tmp_path):
    """scripts/accelerator_rows.sh: rows one by one, failures reported, the budget kept."""
    spec_path, nb_dir, counter = fake
    res, after = tmp_path / "res", tmp_path / "after.txt"
    env = {**os.environ, "PYTHON": sys.executable, "AFTER_ROW": f"echo row >> {after}",
           "RUN_ARGS": f"--notebook-dir {nb_dir} --results {res}"}
    script = str(ROOT / "scripts" / "accelerator_rows.sh")
    proc = subprocess.run(["bash", script, "300", str(tmp_path / "out"), f"{spec_path}/big",
                           f"{spec_path}/nosuch", "not-a-row"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "big: exit 0" in proc.stdout and "nosuch: exit 2" in proc.stdout
    assert "not-a-row: not SPEC/ROW" in proc.stderr
    rows = {r["name"]: r for r in json.loads((res / "fake.json").read_text())["rows"]}
    assert rows["big"]["status"] == "ok" and rows["big"]["mean"] == pytest.approx(5.0)
    assert after.read_text() == "row\nrow\n" and counter.read_text() == "x"
    # no budget left: nothing starts
    proc = subprocess.run(["bash", script, "10", str(tmp_path / "out"), f"{spec_path}/a"],
                          env={**env, "MIN_LEFT": "20"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "a: not started, 10 s of the budget left" in proc.stdout
    assert counter.read_text() == "x"
