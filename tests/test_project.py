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


def test_every_module_has_one_public_short_name():
    """The files are grouped by rung (kernels/, methods/, finite/, infra/); each module is
    listed in kipnb.LOCATIONS, and its short name is the same module object."""
    import importlib

    import kipnb

    pkg = ROOT / "kipnb"
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in pkg.rglob("*.py") if p.name != "__init__.py"
    }
    assert files == set(kipnb.LOCATIONS.values()), (
        f"modules missing from kipnb.LOCATIONS: {sorted(files - set(kipnb.LOCATIONS.values()))}; "
        f"listed but absent: {sorted(set(kipnb.LOCATIONS.values()) - files)}")
    for short, full in kipnb.LOCATIONS.items():
        module = importlib.import_module(f"kipnb.{short}")
        assert module is importlib.import_module(full) is getattr(kipnb, short)
        assert module.__spec__.name == full


def test_no_private_name_crosses_modules():
    """A module uses only the public names of the others (``krr._x`` from sampling is a
    defect; tests may look inside)."""
    import re

    import kipnb

    shorts = set(kipnb.LOCATIONS)
    offenders = []
    for path in sorted((ROOT / "kipnb").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        own = path.stem
        names = set(shorts)  # the modules' short names, and what this file imports them as
        for m in re.finditer(r"from kipnb(?:\.\w+)* import \(?([^\n)]+)", text):
            for item in m.group(1).split(","):
                parts = item.strip().split(" as ")
                if parts[0].startswith("_") and not parts[0].startswith("__"):
                    offenders.append(f"{path.relative_to(ROOT)}: imports {parts[0]}")
                if parts[0] in shorts and len(parts) == 2:
                    names.add(parts[1].strip())
        names.discard(own)
        pattern = re.compile(rf"(?<![\w.])({'|'.join(sorted(names))})\._[a-z]\w*")
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in pattern.finditer(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {m.group(0)}")
    assert not offenders, "private names used across modules:\n" + "\n".join(offenders)
