"""Coursework with the notebooks: exercise checks, student copies, grading.

The lesson notebooks 01-07 each hold exercises in nbgrader's format: a solution cell
(``### BEGIN SOLUTION`` ... ``### END SOLUTION``) where the student writes a core step of
the method, and an autograded test cell (with a ``points`` value) that calls
:func:`check` on visible test cases and, between ``### BEGIN HIDDEN TESTS`` and
``### END HIDDEN TESTS``, on hidden ones. The checks compare the student's function
with kipnb's reference on random inputs and say what is wrong ("labels are not
centred", "ridge not relative to the trace").

A failed check does not raise: it prints its message to **stderr**. nbgrader scores an
autograded test cell 0 when its output holds an error *or* stderr text
(``nbgrader.utils.determine_grade``), so the notebook runs on to the end under papermill
or "Run all" while the grade is still 0. The lesson then goes on through :func:`use`,
which returns the student's function if it passes the visible tests and kipnb's
reference (with a printed note) otherwise.

::

    python -m kipnb.course student                  # build/student/*.ipynb (needs nbgrader)
    python -m kipnb.course grade SUBMISSIONS        # build/grades/scores.{csv,md}
    python -m kipnb.course grade SUBMISSIONS -f tiny.yaml -p DATASET digits

``SUBMISSIONS/<student>/**/NN_name.ipynb`` are the collected notebooks (nbgrader's
``submitted/<student>/<assignment>/`` layout works). Grading restores every autograded
test cell from the instructor's notebook (hidden tests included, as nbgrader's
``OverwriteCells`` does), executes the notebook headless with :mod:`kipnb.run`'s
parameters, and scores each test cell as nbgrader does.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import io
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EXERCISES",
    "Exercise",
    "Score",
    "check",
    "failure",
    "grade",
    "make_student_copies",
    "reference",
    "restore_tests",
    "score_notebook",
    "use",
    "write_scores",
]


# ---------------------------------------------------------------- reference functions


@functools.lru_cache(maxsize=16)
def _one_hidden_layer_kernel(w_std: float, b_std: float):
    from kipnb import stax

    return stax.serial(stax.Dense(1, w_std, b_std), stax.Relu(), stax.Dense(1, w_std, b_std))[2]


def _ref_relu_nngp(x1, x2, w_std, b_std):
    return _one_hidden_layer_kernel(float(w_std), float(b_std))(x1, x2, "nngp")


def _ref_solve_labels(k_ss, k_ts, labels_t, num_classes, reg, solve_reg):
    from kipnb import krr

    y_t = krr.one_hot_targets(labels_t, num_classes)
    return krr.label_solve_kernels(k_ss, k_ts, y_t, reg=reg, solve_reg=solve_reg)


@functools.cache
def _kip_loss_of_kernels():
    import jax
    import jax.numpy as jnp

    from kipnb import kip

    @jax.jit
    def loss_of(k_ss, k_ts, y_s, y_t, reg):
        kernels = lambda a, b, get: k_ss if b is None else k_ts  # noqa: E731 (precomputed)
        marker = jnp.zeros(1)  # kip_loss asks kernels(x_s, None) and kernels(x_t, x_s)
        return kip.kip_loss(kernels, "ntk", reg, marker, y_s, marker, y_t)[0]

    return loss_of


def _ref_kip_loss(k_ss, k_ts, y_s, y_t, reg):
    import jax.numpy as jnp

    return _kip_loss_of_kernels()(*(jnp.asarray(a, jnp.float32) for a in (k_ss, k_ts, y_s, y_t)),
                                  reg)


def _ref_krr_predict(k_ss, k_ts, y_s, reg):
    from kipnb import krr

    return krr.krr(k_ss, k_ts, y_s, reg=reg)


def _ref_importance_weights(probs, indices):
    from kipnb import sampling

    return sampling.importance_weights(probs, indices)


def _ref_normalized_distance(w_end, w_start, w_target):
    import jax
    import jax.numpy as jnp

    from kipnb import tm

    return jax.jit(tm.normalized_distance)(jnp.asarray(w_end), jnp.asarray(w_start),
                                           jnp.asarray(w_target))


def _ref_growing_window(iteration, min_start_epoch, current_max_start_epoch, max_start_epoch,
                        expansion_end):
    from kipnb import tm

    config = tm.TMConfig(method="datm", min_start_epoch=min_start_epoch,
                         current_max_start_epoch=current_max_start_epoch,
                         max_start_epoch=max_start_epoch, expansion_end=expansion_end)
    return tm.start_epoch_window(config, iteration)


# ------------------------------------------------- the mistakes the messages diagnose


def _nngp_variant(x1, x2, w_std, b_std, *, per_dim=True, bias=True, factor=2 * math.pi,
                  layers=1):
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    d = x1.shape[1] if per_dim else 1
    b2 = b_std**2 if bias else 0.0
    k12 = w_std**2 * x1 @ x2.T / d + b2
    k11 = w_std**2 * (x1**2).sum(1) / d + b2
    k22 = w_std**2 * (x2**2).sum(1) / d + b2
    if layers == 0:
        return k12
    norm = np.sqrt(np.outer(k11, k22))
    cos = np.clip(k12 / norm, -1, 1)
    theta = np.arccos(cos)
    return w_std**2 * norm / factor * (np.sin(theta) + (np.pi - theta) * cos) + b2


def _labels_variant(k_ss, k_ts, labels_t, num_classes, reg, solve_reg, *, centred=True,
                    relative=True, tikhonov="relative"):
    k_ss, k_ts = np.asarray(k_ss, np.float64), np.asarray(k_ts, np.float64)
    n = len(k_ss)
    lam = reg * np.trace(k_ss) / n if relative else reg
    a = np.linalg.solve(k_ss + lam * np.eye(n), k_ts.T).T
    y = np.eye(num_classes)[np.asarray(labels_t)] - (1.0 / num_classes if centred else 0.0)
    g = a.T @ a
    mu = {"relative": solve_reg * np.trace(g) / n, "absolute": solve_reg, "none": 0.0}[tikhonov]
    return np.linalg.solve(g + mu * np.eye(n), a.T @ y)


def _pred_variant(k_ss, k_ts, y_s, reg, *, ridge="relative"):
    k_ss, k_ts = np.asarray(k_ss, np.float64), np.asarray(k_ts, np.float64)
    n = len(k_ss)
    lam = {"relative": reg * np.trace(k_ss) / n, "absolute": reg, "trace": reg * np.trace(k_ss),
           "none": 0.0}[ridge]
    return k_ts @ np.linalg.solve(k_ss + lam * np.eye(n), np.asarray(y_s, np.float64))


def _loss_variant(k_ss, k_ts, y_s, y_t, reg, *, half=True, over_classes="mean",
                  ridge="relative"):
    err = (_pred_variant(k_ss, k_ts, y_s, reg, ridge=ridge) - np.asarray(y_t)) ** 2
    per = err.mean(1) if over_classes == "mean" else err.sum(1)
    return (0.5 if half else 1.0) * per.mean()


def _window_variant(iteration, min_start_epoch, current_max_start_epoch, max_start_epoch,
                    expansion_end, *, grow=True, cap=True, rnd=int, start_at_max=False):
    lo, current, hi, end = (min_start_epoch, current_max_start_epoch, max_start_epoch,
                            expansion_end)
    if start_at_max:
        return lo, hi
    if not grow:
        return lo, current
    up = current + rnd((hi - current) * iteration / end)
    return lo, (min(up, hi) if cap else up)


def _normalised(probs, indices, how):
    w = 1 / np.asarray(probs)[indices]
    return w / (w.sum() if how == "sum" else w.mean())


# ------------------------------------------------------------------ the random cases


def _kernel(rng, n, scale):
    f = rng.normal(size=(n, 24))
    return scale * f @ f.T / 24, f


def _cross(rng, f_s, n_t, scale):
    g = rng.normal(size=(n_t, f_s.shape[1]))
    return scale * g @ f_s.T / f_s.shape[1]


def _cases_relu_nngp(rng, hidden):
    out = []
    n1, n2, d = 4, 4, 6  # fixed shapes: JAX compiles once for visible and hidden
    for i in range(4 if hidden else 2):
        x1 = rng.normal(size=(n1, d)).astype(np.float32)
        x2 = x1 if hidden and i == 0 else rng.normal(size=(n2, d))
        out.append(dict(x1=x1, x2=np.asarray(x2, np.float32),
                        w_std=float(rng.choice([1.0, math.sqrt(2), 1.7])),
                        b_std=float(rng.choice([0.1, 0.3, 0.5]))))
    return out


def _cases_solve_labels(rng, hidden):
    out = []
    n_s, n_t, c = 5, 40, 3  # fixed shapes: one compilation
    for _ in range(3 if hidden else 2):
        scale = float(rng.uniform(3, 6))
        k_ss, f = _kernel(rng, n_s, scale)
        out.append(dict(k_ss=k_ss.astype(np.float32),
                        k_ts=_cross(rng, f, n_t, scale).astype(np.float32),
                        labels_t=rng.integers(0, c, n_t), num_classes=c,
                        reg=float(rng.uniform(0.05, 0.2)), solve_reg=float(rng.uniform(0.02, 0.1))))
    return out


def _support_cases(rng, hidden, with_targets):
    out = []
    n_s, n_t, c = 6, 20, 4  # fixed shapes: one compilation
    for _ in range(3 if hidden else 2):
        scale = float(rng.uniform(3, 6))
        k_ss, f = _kernel(rng, n_s, scale)
        case = dict(k_ss=k_ss.astype(np.float32),
                    k_ts=_cross(rng, f, n_t, scale).astype(np.float32),
                    y_s=(np.eye(c)[rng.integers(0, c, n_s)] - 1 / c).astype(np.float32))
        if with_targets:
            case["y_t"] = (np.eye(c)[rng.integers(0, c, n_t)] - 1 / c).astype(np.float32)
        case["reg"] = float(rng.uniform(0.1, 0.5))
        out.append(case)
    return out


def _cases_importance_weights(rng, hidden):
    out = []
    for _ in range(3 if hidden else 2):
        n = int(rng.integers(20, 60))
        probs = rng.dirichlet(np.ones(n))
        out.append(dict(probs=probs, indices=rng.choice(n, int(rng.integers(5, 15)), p=probs)))
    return out


def _cases_normalized_distance(rng, hidden):
    out = []
    p = 40  # fixed shape: one compilation
    for _ in range(3 if hidden else 2):
        start = rng.normal(size=p).astype(np.float32)
        target = (start + rng.normal(size=p)).astype(np.float32)
        end = (start + rng.uniform(0.2, 0.8) * (target - start) + 0.3 * rng.normal(size=p))
        out.append(dict(w_end=end.astype(np.float32), w_start=start, w_target=target))
    return out


def _cases_growing_window(rng, hidden):
    out = []
    for _ in range(3 if hidden else 2):
        lo = int(rng.integers(0, 2)) if hidden else 0
        current = lo + int(rng.integers(1, 4))
        hi = current + int(rng.integers(3, 9))
        end = int(rng.integers(7, 40))
        for it in sorted({0, 1, end // 3, end // 2, end - 1, end, end + 5, 2 * end}):
            out.append(dict(iteration=it, min_start_epoch=lo, current_max_start_epoch=current,
                            max_start_epoch=hi, expansion_end=end))
    return out


# --------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Exercise:
    """One exercise: its reference, its random test cases and its diagnosable mistakes.

    Attributes:
      name: the function the student writes (and the exercise's name in the scores).
      notebook: the lesson notebook it belongs to.
      signature: the call, for messages.
      where: kipnb's implementation the tests compare with.
      reference: kipnb's function with the student's signature.
      cases: ``cases(rng, hidden) -> [kwargs, ...]`` random inputs.
      mistakes: ``[(message, wrong_function), ...]``: an answer that matches a wrong
        function gets its message.
      rtol: relative tolerance of the comparison (float32 vs float64 answers pass).
      nan_hint: added to the message when the answer has NaN/Inf values.
    """

    name: str
    notebook: str
    signature: str
    where: str
    reference: Callable
    cases: Callable
    mistakes: tuple = ()
    rtol: float = 2e-3
    nan_hint: str = ""


def _v(fn, **kw):
    return lambda *a, **k: fn(*a, **k, **kw)


EXERCISES: dict[str, Exercise] = {e.name: e for e in [
    Exercise(
        "relu_nngp", "01_kernels_and_krr", "relu_nngp(x1, x2, w_std, b_std)",
        "kipnb.stax.serial(Dense(1, w_std, b_std), Relu(), Dense(1, w_std, b_std))'s NNGP",
        _ref_relu_nngp, _cases_relu_nngp,
        mistakes=(
            ("the input layer's covariance is w_std² · x·x' / d + b_std²: divide the dot "
             "product by the input dimension d", _v(_nngp_variant, per_dim=False)),
            ("b_std² is missing: each Dense layer adds the bias variance b_std²",
             _v(_nngp_variant, bias=False)),
            ("the ReLU arc-cosine factor is sqrt(K(x,x) K(x',x')) / (2π), not / π",
             _v(_nngp_variant, factor=math.pi)),
            ("only the first Dense layer: apply the ReLU arc-cosine step, then the output "
             "Dense layer (w_std² · ... + b_std²)", _v(_nngp_variant, layers=0)),
        ),
        nan_hint=" (clip cos θ to [-1, 1] before arccos: x paired with itself gives cos θ = 1 "
                 "up to rounding)",
    ),
    Exercise(
        "solve_labels", "02_label_solve",
        "solve_labels(k_ss, k_ts, labels_t, num_classes, reg, solve_reg)",
        "kipnb.krr.label_solve_kernels(k_ss, k_ts, one_hot_targets(labels_t, C), reg, solve_reg)",
        _ref_solve_labels, _cases_solve_labels,
        mistakes=(
            ("labels are not centred: the targets are one-hot minus 1/C",
             _v(_labels_variant, centred=False)),
            ("ridge not relative to the trace: λ = reg · tr(K_ss) / n_s",
             _v(_labels_variant, relative=False)),
            ("the Tikhonov term is missing: solve (AᵀA + μI) y_s = Aᵀ y_t with "
             "μ = solve_reg · tr(AᵀA) / n_s", _v(_labels_variant, tikhonov="none")),
            ("Tikhonov term not relative to the trace: μ = solve_reg · tr(AᵀA) / n_s",
             _v(_labels_variant, tikhonov="absolute")),
        ),
    ),
    Exercise(
        "kip_loss", "03_kip", "kip_loss(k_ss, k_ts, y_s, y_t, reg)",
        "kipnb.kip.kip_loss", _ref_kip_loss,
        lambda rng, hidden: _support_cases(rng, hidden, True),
        mistakes=(
            ("the factor ½ is missing: KIP's loss is ½ · the mean squared error",
             _v(_loss_variant, half=False)),
            ("average over the classes too (the mean over targets and classes), not the sum",
             _v(_loss_variant, over_classes="sum")),
            ("ridge not relative to the trace: λ = reg · tr(K_ss) / n",
             _v(_loss_variant, ridge="absolute")),
            ("the ridge is missing: predict with (K_ss + λI)⁻¹, λ = reg · tr(K_ss) / n",
             _v(_loss_variant, ridge="none")),
        ),
    ),
    Exercise(
        "krr_predict", "04_kip_convnet_and_transfer", "krr_predict(k_ss, k_ts, y_s, reg)",
        "kipnb.krr.krr", _ref_krr_predict,
        lambda rng, hidden: _support_cases(rng, hidden, False),
        mistakes=(
            ("ridge not relative to the trace: λ = reg · tr(K_ss) / n",
             _v(_pred_variant, ridge="absolute")),
            ("the ridge is reg · tr(K_ss) / n: divide the trace by n",
             _v(_pred_variant, ridge="trace")),
            ("the ridge is missing: (K_ss + λI)⁻¹ with λ = reg · tr(K_ss) / n",
             _v(_pred_variant, ridge="none")),
        ),
    ),
    Exercise(
        "importance_weights", "05_importance_sampling", "importance_weights(probs, indices)",
        "kipnb.sampling.importance_weights", _ref_importance_weights, _cases_importance_weights,
        mistakes=(
            ("the factor 1/N is missing: the weights are 1 / (N p_i)",
             lambda probs, indices: 1 / np.asarray(probs)[indices]),
            ("inverted: the weight is 1 / (N p_i), not N p_i",
             lambda probs, indices: len(probs) * np.asarray(probs)[indices]),
            ("N is the number of training points (len(probs)), not the batch size",
             lambda probs, indices: 1 / (len(indices) * np.asarray(probs)[indices])),
            ("do not normalise the weights: 1 / (N p_i) as they are keep the loss unbiased",
             lambda probs, indices: _normalised(probs, indices, "sum")),
            ("do not normalise the weights: 1 / (N p_i) as they are keep the loss unbiased",
             lambda probs, indices: _normalised(probs, indices, "mean")),
        ),
    ),
    Exercise(
        "normalized_distance", "06_trajectory_matching",
        "normalized_distance(w_end, w_start, w_target)",
        "kipnb.tm.normalized_distance", _ref_normalized_distance, _cases_normalized_distance,
        mistakes=(
            ("not normalised: divide by ‖w_start − w_target‖²",
             lambda w_end, w_start, w_target: np.sum((np.asarray(w_end) - w_target) ** 2)),
            ("MTT's loss uses squared distances: no square roots",
             lambda w_end, w_start, w_target: np.linalg.norm(np.asarray(w_end) - w_target)
             / np.linalg.norm(np.asarray(w_start) - w_target)),
            ("normalise by the distance from the start to the target, ‖w_start − w_target‖²",
             lambda w_end, w_start, w_target: np.sum((np.asarray(w_end) - w_target) ** 2)
             / np.sum((np.asarray(w_end) - w_start) ** 2)),
        ),
    ),
    Exercise(
        "growing_window", "07_datm",
        "growing_window(iteration, min_start_epoch, current_max_start_epoch, max_start_epoch, "
        "expansion_end)",
        "kipnb.tm.start_epoch_window", _ref_growing_window, _cases_growing_window,
        mistakes=(
            ("the window does not grow: its upper end rises from current_max_start_epoch to "
             "max_start_epoch by iteration expansion_end", _v(_window_variant, grow=False)),
            ("the window starts at [min_start_epoch, current_max_start_epoch) and grows; it "
             "is not [min, max) from the start", _v(_window_variant, start_at_max=True)),
            ("the upper end must be capped at max_start_epoch after expansion_end",
             _v(_window_variant, cap=False)),
            ("round the growth down (int(), as DATM does), not to the nearest integer",
             _v(_window_variant, rnd=round)),
        ),
        rtol=0.0,
    ),
]}


def reference(name: str) -> Callable:
    """kipnb's implementation of exercise ``name``, with the student's signature.

    Args:
      name: a key of :data:`EXERCISES` (``'relu_nngp'``, ``'solve_labels'``, ...).

    Returns:
      The reference function.

    Example:
      >>> import numpy as np
      >>> w = reference("importance_weights")(np.array([0.5, 0.5]), np.array([0]))
      >>> float(w[0])
      1.0
    """
    return _exercise(name).reference


def _exercise(name: str) -> Exercise:
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; exercises: {sorted(EXERCISES)}")
    return EXERCISES[name]


# ---------------------------------------------------------------------- the checks


def _as_array(x) -> np.ndarray:
    if isinstance(x, tuple):
        return np.asarray([float(v) for v in x])
    return np.asarray(x, np.float64)


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    if a.shape != b.shape:
        return False
    if rtol == 0:
        return bool(np.array_equal(a, b))
    return bool(np.linalg.norm(a - b) <= rtol * max(np.linalg.norm(b), 1e-12))


def _describe(kwargs: dict) -> str:
    parts = []
    for k, v in kwargs.items():
        parts.append(f"{k}: shape {np.shape(v)}" if np.ndim(v) else f"{k}={v!r}")
    return ", ".join(parts)


def _diagnose(ex: Exercise, fn: Callable, cases: Sequence[dict]) -> tuple[str | None, int]:
    """``(message, cases passed)``; message None when every case passes."""
    for i, kwargs in enumerate(cases):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = fn(*copy.deepcopy(list(kwargs.values())))  # positional: any names
        except NotImplementedError:
            return f"{ex.name} is not written yet (it raises NotImplementedError)", i
        except Exception as e:  # the student's code failed: say how, grade 0
            return f"{ex.name}({_describe(kwargs)}) raised {type(e).__name__}: {e}", i
        want = _as_array(ex.reference(**copy.deepcopy(kwargs)))
        try:
            got_a = _as_array(got)
        except (TypeError, ValueError):
            return (f"{ex.name} returned {type(got).__name__}, expected an array of shape "
                    f"{want.shape}"), i
        if got_a.shape != want.shape:
            return (f"{ex.name}({_describe(kwargs)}) returned shape {got_a.shape}, expected "
                    f"{want.shape}"), i
        if not np.isfinite(got_a).all():
            return f"{ex.name}({_describe(kwargs)}) returned NaN or Inf values{ex.nan_hint}", i
        if _close(got_a, want, ex.rtol):
            continue
        for message, wrong in ex.mistakes:
            bad = _as_array(wrong(**copy.deepcopy(kwargs)))
            tol = max(ex.rtol, 1e-6)
            if not _close(bad, want, 5 * tol) and _close(got_a, bad, tol):
                return message, i
        err = np.linalg.norm(got_a - want) / max(np.linalg.norm(want), 1e-12)
        return (f"{ex.name}({_describe(kwargs)}) differs from {ex.where}: relative error "
                f"{err:.3g} (tolerance {ex.rtol:g})"), i
    return None, len(cases)


def failure(name: str, fn: Callable, hidden: bool = False, seed: int | None = None) -> str | None:
    """What is wrong with the student's ``fn`` (None: nothing), on random inputs.

    Args:
      name: the exercise (a key of :data:`EXERCISES`).
      fn: the student's function.
      hidden: the hidden test cases (another seed, more and harder inputs) instead of
        the visible ones.
      seed: the random inputs' seed (default: 0 visible, 1 hidden).

    Returns:
      The message of the first failing case, or None when every case passes.

    Example:
      >>> failure("importance_weights", lambda probs, indices: 1 / probs[indices])
      'the factor 1/N is missing: the weights are 1 / (N p_i)'
    """
    ex = _exercise(name)
    rng = np.random.default_rng((1 if hidden else 0) if seed is None else seed)
    message, _ = _diagnose(ex, fn, ex.cases(rng, hidden))
    return message


def check(name: str, fn: Callable, hidden: bool = False, seed: int | None = None) -> None:
    """The test cell's call: test ``fn`` against kipnb's reference on random inputs.

    Prints an ``ok`` line to stdout, or ``FAILED name: message`` to **stderr**, which
    nbgrader scores 0 like an error, without raising, so the notebook runs on. It
    returns None on purpose: a value shown as the cell's result would be read by
    nbgrader as partial credit.

    Args:
      name: the exercise (a key of :data:`EXERCISES`).
      fn: the student's function.
      hidden: run the hidden test cases.
      seed: the random inputs' seed (default: 0 visible, 1 hidden).

    Example:
      >>> check("importance_weights", reference("importance_weights"))
      importance_weights: visible tests passed
    """
    kind = "hidden" if hidden else "visible"
    message = failure(name, fn, hidden, seed)
    if message is None:
        print(f"{name}: {kind} tests passed", flush=True)
        return
    sys.stdout.flush()
    print(f"FAILED {name} ({kind} tests): {message}", file=sys.stderr, flush=True)


def use(name: str, fn: Callable) -> Callable:
    """The function the lesson goes on with: ``fn`` if it passes the visible tests, else
    kipnb's reference, with a printed note.

    Args:
      name: the exercise.
      fn: the student's function.

    Returns:
      ``fn`` or :func:`reference` ``(name)``.

    Example:
      >>> def blank(probs, indices):
      ...     raise NotImplementedError()
      >>> f = use("importance_weights", blank)  # doctest: +ELLIPSIS
      NOTE: importance_weights is not written yet ...
      >>> f is reference("importance_weights")
      True
    """
    ex = _exercise(name)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        message, _ = _diagnose(ex, fn, ex.cases(np.random.default_rng(0), False))
    if message is None:
        return fn
    print(f"NOTE: {message}.\n      The lesson continues with kipnb's reference implementation "
          f"({ex.where}).", flush=True)
    return ex.reference


# ------------------------------------------------------------------ student copies


def _nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def _is_test_cell(cell) -> bool:
    m = _nbgrader_meta(cell)
    return bool(m.get("grade")) and not m.get("solution") and cell.get("cell_type") == "code"


def make_student_copies(source_dir: str | Path | None = None,
                        output_dir: str | Path = "build/student") -> list[Path]:
    """Write the student copies of the notebooks with nbgrader's own preprocessors.

    ``CheckCellMetadata``, ``ClearSolutions`` (solutions become ``# YOUR CODE HERE`` /
    ``raise NotImplementedError()``), ``ClearHiddenTests``, ``ClearMarkScheme``,
    ``ClearOutput``, ``LockCells`` and ``ComputeChecksums``, in the order nbgrader's
    ``generate_assignment`` applies them. Needs the ``[course]`` extra (nbgrader).

    Args:
      source_dir: the instructor's notebooks (default: ``notebooks/``).
      output_dir: where the copies go.

    Returns:
      The paths written.

    Example:
      >>> paths = make_student_copies(output_dir="build/student")  # doctest: +SKIP
    """
    import nbformat

    try:
        from nbgrader import preprocessors as pp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Student copies need nbgrader: pip install -e '.[course]'") from e
    from kipnb.run import default_notebook_dir

    source_dir = Path(source_dir or default_notebook_dir())
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    steps = [pp.CheckCellMetadata(), pp.ClearSolutions(), pp.ClearHiddenTests(),
             pp.ClearMarkScheme(), pp.ClearOutput(), pp.LockCells(), pp.ComputeChecksums()]
    written = []
    for path in sorted(source_dir.glob("[0-9][0-9]*_*.ipynb")):
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        resources: dict[str, Any] = {}
        for step in steps:
            nb, resources = step.preprocess(nb, resources)
        out = output_dir / path.name
        nbformat.write(nb, out)
        written.append(out)
    return written


# ------------------------------------------------------------------------- grading


@dataclass
class Score:
    """One autograded test cell of one student's notebook."""

    student: str
    notebook: str
    exercise: str
    points: float
    max_points: float
    message: str


def restore_tests(submitted, instructor) -> int:
    """Overwrite the submitted notebook's autograded test cells with the instructor's
    (hidden tests back in, edits undone), matched by ``grade_id``, like nbgrader's
    ``OverwriteCells``. Missing test cells are put back after their solution cell.

    Args:
      submitted: the student's notebook (``nbformat.NotebookNode``), changed in place.
      instructor: the instructor's notebook.

    Returns:
      The number of test cells restored.

    Example:
      >>> restore_tests(student_nb, instructor_nb)  # doctest: +SKIP
      1
    """
    tests = {_nbgrader_meta(c)["grade_id"]: c for c in instructor.cells if _is_test_cell(c)}
    seen = set()
    for i, cell in enumerate(submitted.cells):
        gid = _nbgrader_meta(cell).get("grade_id")
        if gid in tests:
            submitted.cells[i] = copy.deepcopy(tests[gid])
            seen.add(gid)
    for gid in [g for g in tests if g not in seen]:  # deleted by the student: put back
        order = [_nbgrader_meta(c).get("grade_id") for c in instructor.cells]
        prev = order[order.index(gid) - 1]
        ids = [_nbgrader_meta(c).get("grade_id") for c in submitted.cells]
        at = ids.index(prev) + 1 if prev in ids else len(submitted.cells) - 1
        submitted.cells.insert(at, copy.deepcopy(tests[gid]))
    return len(tests)


def score_notebook(nb, student: str = "", notebook: str = "") -> list[Score]:
    """Score an executed notebook's autograded test cells as nbgrader does.

    A test cell earns its points unless its output holds an error or stderr text (then
    0, with that text as the message); a cell that did not run earns 0.

    Args:
      nb: the executed notebook (``nbformat.NotebookNode``).
      student, notebook: labels for the rows.

    Returns:
      One :class:`Score` per test cell.

    Example:
      >>> [s.points for s in score_notebook(executed_nb)]  # doctest: +SKIP
      [2.0]
    """
    rows = []
    for cell in nb.cells:
        if not _is_test_cell(cell):
            continue
        m = _nbgrader_meta(cell)
        pts = float(m.get("points", 0))
        problems = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"{out.get('ename')}: {out.get('evalue')}")
            elif out.get("output_type") == "stream" and out.get("name") == "stderr":
                problems.append(out.get("text", "").strip())
        if problems:
            msg = " | ".join(p.replace("\n", " | ") for p in problems if p)
            rows.append(Score(student, notebook, m["grade_id"], 0.0, pts, msg or "error"))
        elif cell.get("execution_count") is None and not cell.get("outputs"):
            rows.append(Score(student, notebook, m["grade_id"], 0.0, pts,
                              "not executed (the notebook stopped before this cell)"))
        else:
            rows.append(Score(student, notebook, m["grade_id"], pts, pts, "ok"))
    return rows


def write_scores(scores: Sequence[Score], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``scores.csv`` and ``scores.md`` (student, notebook, exercise, points, message).

    Args:
      scores: the rows.
      output_dir: where the two files go.

    Returns:
      ``(csv_path, markdown_path)``.

    Example:
      >>> write_scores(grade("submitted"), "build/grades")  # doctest: +SKIP
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cols = ["student", "notebook", "exercise", "points", "max_points", "message"]
    csv_path, md_path = output_dir / "scores.csv", output_dir / "scores.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for s in scores:
            w.writerow([s.student, s.notebook, s.exercise, f"{s.points:g}", f"{s.max_points:g}",
                        s.message])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in scores:
        msg = s.message.replace("|", "\\|")
        lines.append(f"| {s.student} | {s.notebook} | {s.exercise} | {s.points:g} | "
                     f"{s.max_points:g} | {msg} |")
    totals: dict[str, list[float]] = {}
    for s in scores:
        t = totals.setdefault(s.student, [0.0, 0.0])
        t[0] += s.points
        t[1] += s.max_points
    lines += ["", "| student | total | of |", "|---|---|---|"]
    lines += [f"| {k} | {v[0]:g} | {v[1]:g} |" for k, v in totals.items()]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _submissions(root: Path) -> list[tuple[str, Path]]:
    found = []
    for path in sorted(root.rglob("[0-9][0-9]*_*.ipynb")):
        rel = path.relative_to(root)
        if ".ipynb_checkpoints" in rel.parts:
            continue
        found.append((rel.parts[0] if len(rel.parts) > 1 else root.name, path))
    return found


def _params_for(path: Path, params: dict | None, params_file) -> dict:
    """The parameters of one notebook: the file's global and own keys, then ``params``;
    only those the notebook declares (one parameter set serves notebooks 01-07)."""
    from kipnb.run import load_params_file, notebook_parameters

    declared = notebook_parameters(path)
    file_params = load_params_file(params_file) if params_file else {}
    merged = {k: v for k, v in file_params.items() if not (k[:2].isdigit() and k[2:3] == "_")}
    merged.update(file_params.get(path.stem) or {})
    merged.update(params or {})
    return {k: v for k, v in merged.items() if k in declared}


def grade(submissions: str | Path, output_dir: str | Path = "build/grades",
          params: dict | None = None, params_file: str | Path | None = None,
          source_dir: str | Path | None = None, log=print) -> list[Score]:
    """Execute every submitted notebook headless with its hidden tests and score it.

    Args:
      submissions: ``DIR/<student>/**/NN_name.ipynb``.
      output_dir: gets ``<student>/NN_name.ipynb`` (executed), ``scores.csv`` and
        ``scores.md``.
      params, params_file: notebook parameters, as for :func:`kipnb.run.run_notebooks`
        (``NAME: value`` for all notebooks, ``02_label_solve: {...}`` for one), except
        that a notebook which does not declare a parameter simply does not get it.
      source_dir: the instructor's notebooks (default ``notebooks/``), whose test cells
        replace the submitted ones.
      log: progress messages.

    Returns:
      The scores (also written to ``output_dir``).

    Example:
      >>> scores = grade("submitted", params={"DATASET": "digits"})  # doctest: +SKIP
    """
    import nbformat

    from kipnb.run import default_notebook_dir, run_notebooks

    submissions, output_dir = Path(submissions), Path(output_dir)
    source_dir = Path(source_dir or default_notebook_dir())
    scores: list[Score] = []
    for student, path in _submissions(submissions):
        instructor = source_dir / path.name
        if not instructor.is_file():
            log(f"[kipnb.course] skip {path}: no instructor notebook {instructor}")
            continue
        nb = nbformat.read(path, as_version=4)
        restore_tests(nb, nbformat.read(instructor, as_version=4))
        work = output_dir / student
        restored = work / "restored" / path.name
        restored.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, restored)
        log(f"[kipnb.course] grading {student}/{path.name} ...", flush=True)
        runs = run_notebooks([restored], work, _params_for(restored, params, params_file),
                             log=lambda *a, **k: None)
        executed = Path(runs[0].output_notebook)
        if executed.is_file():
            rows = score_notebook(nbformat.read(executed, as_version=4), student, path.stem)
        else:
            rows = score_notebook(nb, student, path.stem)
        if not runs[0].ok:
            for r in rows:
                if r.message.startswith("not executed"):
                    r.message += f": {runs[0].error}"
        scores.extend(rows)
        got, of = sum(r.points for r in rows), sum(r.max_points for r in rows)
        log(f"[kipnb.course]   {got:g} / {of:g} points", flush=True)
    write_scores(scores, output_dir)
    return scores


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kipnb.course {student,grade} ...``; see the module docstring."""
    from kipnb.run import RunError, parse_value

    ap = argparse.ArgumentParser(prog="python -m kipnb.course", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("student", help="write student copies (nbgrader preprocessors)")
    st.add_argument("-o", "--output", default="build/student")
    st.add_argument("--source", default=None, help="instructor notebooks (default notebooks/)")
    gr = sub.add_parser("grade", help="execute submissions with hidden tests, write scores")
    gr.add_argument("submissions", help="DIR/<student>/**/NN_name.ipynb")
    gr.add_argument("-o", "--output", default="build/grades")
    gr.add_argument("--source", default=None, help="instructor notebooks (default notebooks/)")
    gr.add_argument("-p", "--param", nargs=2, action="append", default=[],
                    metavar=("NAME", "VALUE"))
    gr.add_argument("-f", "--params-file", help="YAML/JSON file of parameters")
    args = ap.parse_args(argv)
    if args.cmd == "student":
        for p in make_student_copies(args.source, args.output):
            print(p)
        return 0
    try:
        scores = grade(args.submissions, args.output,
                       {k: parse_value(v) for k, v in args.param}, args.params_file, args.source)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"rows": len(scores), "points": sum(s.points for s in scores),
                      "of": sum(s.max_points for s in scores),
                      "table": str(Path(args.output) / "scores.md")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
