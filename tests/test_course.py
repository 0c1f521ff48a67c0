"""Coursework: the exercise checks, the student copies (nbgrader) and grading."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import nbformat
import numpy as np
import pytest

from kipnb import archs, course, krr, sampling, tm

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
LESSONS = sorted(NB_DIR.glob("0[1-7]_*.ipynb"))


def nbgrader(cell):
    return cell.get("metadata", {}).get("nbgrader", {})


def exercise_cells(nb):
    """[(solution cell, test cell)] of a notebook."""
    sols = [c for c in nb.cells if nbgrader(c).get("solution")]
    tests = {nbgrader(c)["grade_id"]: c for c in nb.cells if nbgrader(c).get("grade")}
    return [(s, tests[f"test_{nbgrader(s)['grade_id']}"]) for s in sols]


def run_cells(*cells):
    """Execute cells' sources in one namespace; returns (stdout, stderr)."""
    out, err, ns = io.StringIO(), io.StringIO(), {}
    exec("import jax\nimport jax.numpy as jnp\nimport numpy as np", ns)  # the notebooks' imports
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for cell in cells:
            exec(compile(cell.source, "<cell>", "exec"), ns)  # noqa: S102 (our notebooks)
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    course.make_student_copies(NB_DIR, out)
    return out


# ------------------------------------------------------------ checks and references


@pytest.mark.parametrize("name", sorted(course.EXERCISES))
def test_reference_passes_and_each_mistake_gets_its_message(name):
    ex = course.EXERCISES[name]
    assert course.failure(name, ex.reference) is None
    assert course.failure(name, ex.reference, hidden=True) is None
    assert ex.mistakes

    def blank(*args):
        raise NotImplementedError()

    with contextlib.redirect_stdout(io.StringIO()) as note:
        fallback = course.use(name, blank)
    assert fallback is ex.reference and "lesson continues" in note.getvalue()
    case = ex.cases(np.random.default_rng(0), False)[0]
    np.testing.assert_allclose(np.asarray(fallback(*case.values()), float),  # as the lesson calls it
                               np.asarray(ex.reference(**case), float))
    for message, wrong in ex.mistakes:
        assert course.failure(name, wrong) == message
        assert course.failure(name, wrong, hidden=True) == message


def test_check_reports_on_stderr_without_raising(capsys):
    def blank(probs, indices):
        raise NotImplementedError()

    assert course.check("importance_weights", blank) is None
    cap = capsys.readouterr()
    assert "FAILED importance_weights (visible tests): importance_weights is not written yet" in cap.err
    course.check("importance_weights", course.reference("importance_weights"), hidden=True)
    cap = capsys.readouterr()
    assert cap.err == "" and "hidden tests passed" in cap.out
    msg = course.failure("krr_predict", lambda k_ss, k_ts, y_s, reg: k_ts[:, :2])
    assert "returned shape" in msg


def test_use_falls_back_to_the_reference_with_a_note(capsys):
    def wrong(probs, indices):
        return 1 / np.asarray(probs)[indices]

    assert course.use("importance_weights", wrong) is course.reference("importance_weights")
    assert "NOTE: the factor 1/N is missing" in capsys.readouterr().out
    right = course.reference("importance_weights")
    assert course.use("importance_weights", lambda p, i: right(p, i)) is not right


def test_label_solve_kernels_is_label_solve():
    rng = np.random.default_rng(0)
    x_s, x_t = rng.normal(size=(6, 5)), rng.normal(size=(40, 5))
    labels = rng.integers(0, 3, 40)

    x_s, x_t = x_s.astype(np.float32), x_t.astype(np.float32)
    _, _, kernel_fn = archs.fc(depth=1, num_classes=3)
    y_t = krr.one_hot_targets(labels, 3)
    blockwise = krr.label_solve(kernel_fn, x_s, x_t, y_t, reg=1e-2, solve_reg=1e-3, block_size=16)
    whole = krr.label_solve_kernels(kernel_fn(x_s, None, "ntk"), kernel_fn(x_t, x_s, "ntk"), y_t,
                                    reg=1e-2, solve_reg=1e-3)
    np.testing.assert_allclose(whole, blockwise, rtol=1e-3, atol=1e-4)


def test_importance_weights_are_the_samplers():
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 3

    def loss_fn(support, xb, yb):
        return np.abs(xb).sum(1) + 0.1

    for stratify in (True, False):
        s = sampling.ImportanceSampler(x, labels, 3, batch_size=12, loss_fn=loss_fn,
                                       stratify=stratify, block_size=16)
        idx, w = s.sample(0, {})
        np.testing.assert_allclose(sampling.importance_weights(s.probs, idx), w, rtol=1e-10)


def test_normalized_distance():
    start, target = np.zeros(4), np.full(4, 2.0)
    assert float(tm.normalized_distance(start, start, target)) == 1.0
    assert float(tm.normalized_distance(target, start, target)) == 0.0
    assert abs(float(tm.normalized_distance(np.ones(4), start, target)) - 0.25) < 1e-7


# ------------------------------------------------------------ notebooks and copies


@pytest.mark.parametrize("nb_path", LESSONS, ids=lambda p: p.stem)
def test_instructor_exercises_pass_and_student_stubs_fail(nb_path, student_dir):
    inst = nbformat.read(nb_path, as_version=4)
    pairs = exercise_cells(inst)
    assert pairs, f"{nb_path.name} has no exercise"
    for sol, test in pairs:
        name = nbgrader(sol)["grade_id"]
        assert name in course.EXERCISES and course.EXERCISES[name].notebook == nb_path.stem
        assert "### BEGIN SOLUTION" in sol.source and "### BEGIN HIDDEN TESTS" in test.source
        meta = nbgrader(test)
        assert meta["points"] > 0 and meta["locked"] and not meta["solution"]
        assert meta["schema_version"] == 3
        out, err = run_cells(sol, test)
        assert err == "" and "visible tests passed" in out and "hidden tests passed" in out
    stud = nbformat.read(student_dir / nb_path.name, as_version=4)
    text = json.dumps(stud.cells)
    assert "BEGIN HIDDEN TESTS" not in text and "hidden=True" not in text
    assert "BEGIN SOLUTION" not in text and "raise NotImplementedError()" in text
    assert not any(c.get("outputs") for c in stud.cells)
    for sol, test in exercise_cells(stud):
        assert test.metadata.get("editable") is False  # LockCells
        out, err = run_cells(sol, test)
        assert "is not written yet" in err
    assert [c.source for c in stud.cells if "parameters" in c.metadata.get("tags", [])] == [
        c.source for c in inst.cells if "parameters" in c.metadata.get("tags", [])]


def test_grade_instructor_blank_and_wrong_submissions(student_dir, tmp_path):
    """02 end to end: executed headless, hidden tests restored, one score table."""
    name = "02_label_solve.ipynb"
    subs = tmp_path / "submitted"
    for who in ("instructor", "blank", "wrong"):
        (subs / who).mkdir(parents=True)
    (subs / "instructor" / name).write_text((NB_DIR / name).read_text())
    (subs / "blank" / name).write_text((student_dir / name).read_text())
    wrong = nbformat.read(student_dir / name, as_version=4)
    inst = nbformat.read(NB_DIR / name, as_version=4)
    sol = next(c for c in inst.cells if nbgrader(c).get("solution"))
    for cell in wrong.cells:
        if nbgrader(cell).get("solution"):  # labels not centred
            cell.source = sol.source.replace(" - 1.0 / num_classes", "")
            assert cell.source != sol.source
    nbformat.write(wrong, subs / "wrong" / name)

    params = {"DATASET": "digits", "IPCS": [1], "N_TARGETS": None, "N_TEST": None}
    out = tmp_path / "grades"
    scores = course.grade(subs, out, params=params, source_dir=NB_DIR, log=lambda *a, **k: None)
    by = {s.student: s for s in scores}
    assert len(scores) == 3 and set(by) == {"instructor", "blank", "wrong"}
    assert (by["instructor"].points, by["instructor"].message) == (2, "ok")
    assert by["blank"].points == 0 and "not written yet" in by["blank"].message
    assert by["wrong"].points == 0 and "labels are not centred" in by["wrong"].message
    for who in ("blank", "wrong"):  # ran to the end, on kipnb's reference, with a note
        executed = nbformat.read(out / who / name, as_version=4)
        assert all(c.execution_count is not None for c in executed.cells if c.cell_type == "code")
        assert (out / who / "02_label_solve" / "results.json").is_file()
        text = json.dumps([c.get("outputs") for c in executed.cells])
        assert "The lesson continues with kipnb's reference implementation" in text
        assert "hidden tests" in text  # the restored hidden tests ran
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "student,notebook,exercise,points,max_points,message" and len(rows) == 4
    md = (out / "scores.md").read_text()
    assert "labels are not centred" in md and "| instructor | 2 | 2 |" in md


def test_cli_student_and_grade_of_nothing(tmp_path, capsys):
    assert course.main(["student", "-o", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.ipynb")) == sorted(
        p.name for p in NB_DIR.glob("[0-9][0-9]*_*.ipynb"))
    (tmp_path / "empty").mkdir()
    assert course.main(["grade", str(tmp_path / "empty"), "-o", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "scores.csv").read_text().strip() == (
        "student,notebook,exercise,points,max_points,message")
    assert '"rows": 0' in capsys.readouterr().out
