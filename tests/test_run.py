"""kipnb.run: the papermill runner behind `make run`, on small notebooks written here."""

from __future__ import annotations

import json
import os

import nbformat
import pytest

from kipnb import run
from kipnb.run import RunError


def write_nb(path, params: str, body: str, tag=True):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    p = nbformat.v4.new_code_cell(params)
    if tag:
        p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)
    return path


WRITE = """import json, os
os.makedirs(OUTPUT_DIR, exist_ok=True)
json.dump({"x": X, "name": NAME}, open(os.path.join(OUTPUT_DIR, "results.json"), "w"))"""


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    write_nb(d / "00_first.ipynb", 'X = 1\nNAME = "a"\nOUTPUT_DIR = "out"', WRITE)
    write_nb(d / "01_second.ipynb", 'X = 2\nNAME = "b"\nOUTPUT_DIR = "out"', WRITE)
    return d


def test_find_notebooks(nbdir):
    assert [p.name for p in run.find_notebooks((), nbdir)] == ["00_first.ipynb", "01_second.ipynb"]
    assert run.find_notebooks(["01"], nbdir)[0].name == "01_second.ipynb"
    assert run.find_notebooks(["00_first"], nbdir)[0].name == "00_first.ipynb"
    with pytest.raises(RunError, match="No single notebook matches '07'. Available: 00_first"):
        run.find_notebooks(["07"], nbdir)


def test_runs_with_parameters_and_writes_results(nbdir, tmp_path):
    pfile = tmp_path / "p.yaml"
    pfile.write_text("NAME: fromfile\n01_second:\n  X: 20\n")
    out = tmp_path / "out"
    lines = []
    code = run.main([
        "--notebook-dir", str(nbdir), "-o", str(out), "-f", str(pfile), "-p", "X", "[1, 2]",
    ])  # fmt: skip
    assert code == 0
    r0 = json.loads((out / "00_first" / "results.json").read_text())
    r1 = json.loads((out / "01_second" / "results.json").read_text())
    assert r0 == {"x": [1, 2], "name": "fromfile"}  # command line beats the file
    assert r1 == {"x": [1, 2], "name": "fromfile"}
    assert (out / "00_first.ipynb").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [s["ok"] for s in summary] == [True, True] and summary[0]["seconds"] > 0
    runs = run.run_notebooks(
        run.find_notebooks(["01"], nbdir), out, params_file=pfile,
        log=lambda *a, **k: lines.append(" ".join(map(str, a))),
    )  # fmt: skip
    assert runs[0].results == {"x": 20, "name": "fromfile"}  # per-notebook file entry
    assert any("01_second.ipynb ok in" in ln for ln in lines)
    assert any("1 ok, 0 failed" in ln for ln in lines)


def test_failure_names_notebook_and_cell(nbdir, tmp_path, capsys):
    write_nb(nbdir / "02_bad.ipynb", 'X = 0\nOUTPUT_DIR = "out"', "y = 1 / X")
    code = run.main(["--notebook-dir", str(nbdir), "-o", str(tmp_path / "o"), "02", "00"])
    out = capsys.readouterr().out
    assert code == 1
    assert "02_bad.ipynb FAILED" in out and "ZeroDivisionError: division by zero" in out
    assert "in: y = 1 / X" in out and "cell" in out
    assert "1 not run (use --keep-going)" in out  # stops at the first failure
    code = run.main(
        ["--notebook-dir", str(nbdir), "-o", str(tmp_path / "o"), "--keep-going", "02", "00"]
    )
    assert code == 1 and "1 ok, 1 failed" in capsys.readouterr().out


def test_missing_results_json_fails(nbdir, tmp_path, capsys):
    write_nb(nbdir / "03_quiet.ipynb", 'OUTPUT_DIR = "out"', "pass")
    assert run.main(["--notebook-dir", str(nbdir), "-o", str(tmp_path / "o"), "03"]) == 1
    assert "did not write" in capsys.readouterr().out


def test_parameter_errors(nbdir, tmp_path, capsys):
    assert run.main(["--notebook-dir", str(nbdir), "-o", str(tmp_path), "-p", "XX", "1"]) == 2
    assert "No selected notebook declares the parameter(s) ['XX']" in capsys.readouterr().err
    write_nb(nbdir / "04_untagged.ipynb", "X = 1", "pass", tag=False)
    assert run.main(["--notebook-dir", str(nbdir), "-o", str(tmp_path), "04"]) == 2
    assert "has no cell tagged 'parameters'" in capsys.readouterr().err
    pfile = tmp_path / "p.yaml"
    pfile.write_text("00_first:\n  Y: 3\n")
    assert (
        run.main(["--notebook-dir", str(nbdir), "-o", str(tmp_path), "-f", str(pfile), "00"]) == 2
    )
    assert "00_first.ipynb does not declare ['Y']" in capsys.readouterr().err


def test_parse_value():
    assert run.parse_value("10") == 10 and run.parse_value("0.5") == 0.5
    assert run.parse_value("true") is True and run.parse_value("[1, 10]") == [1, 10]
    assert run.parse_value("fashion_mnist") == "fashion_mnist"


def test_kernels_run_over_ipc_not_tcp(tmp_path):
    """No "Kernel is running over TCP without encryption" warning: kernels use IPC."""
    from kipnb import run

    cls = run.ipc_kernel_manager_class()
    assert cls is not None and cls().transport == "ipc"


def test_export_figures_writes_each_png_of_an_executed_notebook(tmp_path):
    import base64
    import json

    from kipnb import run

    png = base64.b64encode(b"\x89PNG fake").decode()
    nb = {"cells": [
        {"cell_type": "markdown", "source": "x"},
        {"cell_type": "code", "outputs": [{"data": {"text/plain": "1"}},
                                          {"data": {"image/png": png}},
                                          {"data": {"image/png": [png[:4], png[4:]]}}]},
    ]}
    (tmp_path / "nb.ipynb").write_text(json.dumps(nb))
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "cell09-1.png").write_bytes(b"stale")
    paths = run.export_figures(tmp_path / "nb.ipynb", tmp_path / "figs")
    assert [p.name for p in paths] == ["cell01-1.png", "cell01-2.png"]
    assert all(p.read_bytes() == b"\x89PNG fake" for p in paths)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["cell01-1.png", "cell01-2.png"]


@pytest.mark.parametrize("environ, expected", [
    ({"KIPNB_COMPILE_CACHE": "off"}, None),
    ({"KIPNB_COMPILE_CACHE": "0"}, None),
    ({"KIPNB_COMPILE_CACHE": ""}, None),
    ({"KIPNB_COMPILE_CACHE": "/tmp/kc"}, "/tmp/kc"),
    ({"JAX_COMPILATION_CACHE_DIR": "/tmp/jc", "KIPNB_COMPILE_CACHE": "off"}, "/tmp/jc"),
    ({"XDG_CACHE_HOME": "/tmp/xdg"}, "/tmp/xdg/kipnb/jax-compile"),
])
def test_compile_cache_dir(environ, expected):
    assert run.compile_cache_dir(environ) == expected


CACHE_NB = """import json, os
os.makedirs(OUTPUT_DIR, exist_ok=True)
import jax
json.dump({"dir": jax.config.jax_compilation_cache_dir,
           "env": os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")},
          open(os.path.join(OUTPUT_DIR, "results.json"), "w"))"""


@pytest.mark.parametrize("setting", ["cache", "off"])
def test_kernels_use_the_compilation_cache(tmp_path, monkeypatch, setting):
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("KIPNB_COMPILE_CACHE", str(cache) if setting == "cache" else "off")
    nb = write_nb(tmp_path / "00_cache.ipynb", 'OUTPUT_DIR = "out"', CACHE_NB)
    runs = run.run_notebooks([nb], tmp_path / "out", log=lambda *a, **k: None)
    assert runs[0].ok, runs[0].error
    if setting == "cache":
        assert runs[0].results == {"dir": str(cache.resolve()), "env": "0.2"}
    else:
        assert runs[0].results == {"dir": None, "env": None}
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ  # restored after the run
