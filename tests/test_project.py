"""Project promises: pyproject, environment.yml and the CI pins agree; README opens right."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_agrees_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    py = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    assert py.replace(" ", "") == "python" + pyproject()["requires-python"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    reqs = {str(Requirement(r)) for r in pip if not r.startswith("-")}
    assert reqs == {str(Requirement(r)) for r in pyproject()["dependencies"]}
    assert "-e ." in pip or any(r.startswith("-e .") for r in pip)


def test_ci_pins_satisfy_pyproject():
    pins = {}
    for line in (ROOT / "requirements" / "ci.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    opt = pyproject()["optional-dependencies"]
    for r in map(Requirement, pyproject()["dependencies"] + opt["dev"] + opt["course"]):
        name = canonicalize_name(r.name)
        assert name in pins, f"{r.name} is not pinned in requirements/ci.txt (run make pin)"
        assert r.specifier.contains(pins[name]), f"pin {r.name}=={pins[name]} violates {r}"


def test_readme_opens_with_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:30])
    assert "make run" in head and "make test" in head
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if not ln.lstrip().startswith("#")]
    cmds = [ln.strip() for ln in ci]
    # CI proves the main job: the set-up, the whole suite, every notebook, their floors
    assert cmds.index("make data") < cmds.index("make test") < cmds.index("make run")
    assert any("check_results.py build/run .ci/floors.yaml" in c for c in cmds)


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert nb.name in readme, f"README does not list {nb.name}"
    assert re.search(r"python -m kipnb\.run", readme)


def test_license_is_spdx_and_shipped():
    assert pyproject()["license"] == "Apache-2.0"  # an SPDX string, not the deprecated table
    assert "LICENSE" in pyproject()["license-files"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
