"""One long-run loop for every method: checkpoint, exact resume, NaN stop, history, progress.

Optax style: a method exposes pure step functions (``init`` makes a state, ``update``
takes a state and a batch and returns the new state and a dict of metrics), and the user
may write the loop themselves::

    state = kip.init(config, data)
    for step in range(config.steps):
        state, metrics = kip.update(config, state, kip.target_batch(config, data, step))

:func:`run` is the shared driver that ``kip.run``, ``tm.run`` (and more) put around their
step functions. Per step it

1. draws the batch, ``batch_fn(step, state)`` (a function of the step index, so a
   resumed run sees the same batches as an uninterrupted one),
2. calls ``update(state, batch) -> (state, metrics)``,
3. checks the metrics: a ``'finite'`` entry (or, without one, every numeric metric)
   must be finite, else the new state is dropped and ``nan_error`` is raised; the
   checkpoint on disk (the last good state) is kept and the message names it,
4. appends the metrics to ``history`` (a dict of lists),
5. evaluates every ``eval_every`` steps (and at the start / end if asked),
6. writes the checkpoint atomically (:mod:`kipnb.checkpoint`) every
   ``checkpoint_every`` steps and at the end,
7. updates the tqdm progress bar and calls ``callback(info)``; the callback may stop
   the run early by returning :data:`STOP` or raising :class:`StopRun` (the state is
   checkpointed first, and the result says ``stopped=True``).

**Exact resume.** The checkpoint holds the whole state (``pack(state)``), the history,
the step and the elapsed time. Started again with the same ``config`` and
``fingerprint``, :func:`run` continues from the checkpoint, and because batches depend
only on the step index the result is bit-identical to an uninterrupted run (same
machine, same JAX). A larger ``steps`` continues a finished run; other config changes
(but the ``free`` fields) are refused with :class:`kipnb.checkpoint.CheckpointError`
and the file is left in place.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kipnb import checkpoint

__all__ = ["STOP", "LoopResult", "NumericalError", "StopRun", "progress", "run"]


class NumericalError(FloatingPointError):
    """A step's loss or gradient became NaN/Inf (the default error of :func:`run`)."""


class StopRun(Exception):  # noqa: N818 (a signal, not an error)
    """Raise from a :func:`run` callback to stop the run after the current step."""


#: Return this from a :func:`run` callback to stop the run after the current step.
STOP = object()


@dataclass(frozen=True, eq=False)
class LoopResult:
    """What :func:`run` returns.

    Attributes:
      state: the final state (the last good one).
      history: dict of lists (the step's metrics, evaluations) plus ``seconds``.
      step: the number of steps done (all sessions together).
      seconds: wall time of all sessions together.
      stopped: True when a callback stopped the run before ``steps``.
      resumed_from: the step the run was resumed from (0: a fresh start).
    """

    state: Any
    history: dict
    step: int
    seconds: float
    stopped: bool = False
    resumed_from: int = 0


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass

    def __iter__(self):
        return iter(())


def progress(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0,
             desc: str | None = None, enabled: bool = True):
    """A ``tqdm.auto`` progress bar, or a silent stand-in when ``enabled`` is False.

    Args:
      iterable: what to iterate over (None: a bar updated by hand with ``update``).
      total: the number of items (steps).
      initial: items already done (a resumed run).
      desc: the bar's label.
      enabled: False returns ``iterable`` itself (or a bar that does nothing).

    Returns:
      A tqdm bar (iterable if ``iterable`` was given; ``update``, ``set_postfix``,
      ``close``), or ``iterable`` / a no-op bar when disabled.

    Example:
      >>> [i for i in progress(range(3), enabled=False)]
      [0, 1, 2]
    """
    if not enabled:
        return _NoBar() if iterable is None else iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, leave=True)


def _scalar(v):
    """Python float/int/bool of a metric (a 0-d array or a number); others unchanged."""
    if isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, np.ndarray | jax.Array) and np.ndim(v) == 0:
        a = np.asarray(v)
        if a.dtype == bool:
            return bool(a)
        return int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
    return v


def _all_finite(metrics: dict) -> bool:
    for v in metrics.values():
        if isinstance(v, float) and not math.isfinite(v):
            return False
    return True


def _default_nan_error(step: int, metrics: dict, kept: str) -> Exception:
    return NumericalError(
        f"Step {step}: a metric is NaN/Inf ({metrics}); the update was not applied. {kept} "
        "Lower the learning rate or raise the regularization, and run again."
    )


def run(
    state: Any,
    update: Callable[[Any, Any], tuple[Any, dict]],
    steps: int,
    *,
    batch_fn: Callable[[int, Any], Any] | None = None,
    history: dict | None = None,
    step_key: str = "step",
    evaluate: Callable[[Any, int], dict] | None = None,
    eval_every: int = 0,
    eval_at_start: bool = False,
    eval_at_end: bool = False,
    checkpoint_path=None,
    checkpoint_every: int = 0,
    config: dict | None = None,
    fingerprint: str = "",
    free: Iterable[str] = (),
    what: str = "run",
    data_why: str = "the training data differ",
    pack: Callable[[Any], Any] | None = None,
    unpack: Callable[[Any], Any] | None = None,
    nan_error: Callable[[int, dict, str], Exception] | None = None,
    callback: Callable[[dict], Any] | None = None,
    progress_bar: bool = True,
    desc: str | None = None,
    postfix: Callable[[dict, dict], dict] | None = None,
) -> LoopResult:
    """Drive ``update`` for ``steps`` steps with checkpoints, exact resume and NaN stop.

    Args:
      state: the initial state (a pytree; ignored when a checkpoint is resumed, except
        as the template of the checkpoint's shapes).
      update: ``update(state, batch) -> (state, metrics)``; ``metrics`` is a dict of
        scalars (arrays or numbers) appended to ``history`` under their names, except
        ``'finite'`` (a bool: the step is good), which is only checked.
      steps: the total number of steps (all sessions together).
      batch_fn: ``batch_fn(step, state)`` gives step ``step``'s batch (0-based);
        default: the batch is the step index itself.
      history: the empty history to fill (dict of lists, fixes the key order).
      step_key: the name of the step counter in ``history``, in the callback's ``info``
        and in the checkpoint's meta (``'step'``, ``'iteration'``...); evaluation steps
        go to ``'eval_' + step_key``.
      evaluate: ``evaluate(state, step) -> dict`` of results appended to ``history``
        (plus ``wall_time``) and passed to the callback.
      eval_every: evaluate every this many steps (0: never but at start / end).
      eval_at_start: evaluate before the first step of a fresh run.
      eval_at_end: evaluate after the last step (unless that step was just evaluated).
      checkpoint_path: the checkpoint file (None: no checkpoints, no resume).
      checkpoint_every: steps between checkpoints (0: only at the end).
      config: JSON-able dict of the run's settings, checked on resume.
      fingerprint: a string naming the data (and anything else fixed), checked on resume.
      free: config fields that may differ on resume (``steps``, ``eval_every``...).
      what: the run's name in error messages ("KIP").
      data_why: the reason given when the fingerprint differs.
      pack, unpack: ``state -> pytree`` saved in the checkpoint and back (default: the
        state itself); ``unpack`` also places arrays on devices, restores samplers...
      nan_error: ``nan_error(step, metrics, kept) -> Exception`` raised when a step is
        not finite (``step`` 1-based; ``kept`` a sentence naming the checkpoint kept).
      callback: ``callback(info)`` after every step; ``info`` has ``step_key`` and
        ``'step'`` (steps done), the metrics, the evaluation results on evaluation
        steps, ``last`` and ``state``. Return :data:`STOP` or raise :class:`StopRun`
        to stop early.
      progress_bar: show a tqdm progress bar.
      desc: the bar's label (default ``what``).
      postfix: ``postfix(metrics, history) -> dict`` shown on the bar (default: the
        loss and the last ``test_acc``).

    Returns:
      A :class:`LoopResult` (final state, history, steps done, seconds, stopped).

    Raises:
      CheckpointError: the checkpoint belongs to another run or cannot be read (kept).
      Exception: ``nan_error``'s (default :class:`NumericalError`) when a step is NaN.

    Example:
      >>> def update(x, batch):
      ...     return x + batch, {"loss": float(x)}
      >>> res = run(0.0, update, 3, batch_fn=lambda step, x: 1.0, progress_bar=False)
      >>> res.state, res.history["loss"]
      (3.0, [0.0, 1.0, 2.0])
    """
    pack = pack or (lambda s: s)
    unpack = unpack or (lambda t: t)
    batch_fn = batch_fn or (lambda step, s: step)
    nan_error = nan_error or _default_nan_error
    eval_key = "eval_" + step_key
    history = {step_key: [], eval_key: [], "wall_time": []} if history is None else history
    for k in (step_key, eval_key, "wall_time"):
        history.setdefault(k, [])
    free = tuple(free)
    config = {} if config is None else config
    start, elapsed = 0, 0.0

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.exists():
        checkpoint.check_resumable(ckpt, config, fingerprint, what=what, free=free,
                                   data_why=data_why)
        tree, meta = checkpoint.load(ckpt, pack(state))
        state = unpack(tree)
        history = meta["history"]
        start, elapsed = int(meta[step_key]), float(meta["elapsed"])
    saved = [start] if ckpt is not None and start > 0 else []
    t0 = time.perf_counter()

    def now():
        return elapsed + time.perf_counter() - t0

    def save(step):
        if ckpt is None:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save(ckpt, pack(state),
                        {step_key: step, "config": config, "data": fingerprint,
                         "history": history, "elapsed": now()})
        saved[:] = [step]

    def run_eval(step) -> dict:
        out = {k: _scalar(v) for k, v in evaluate(state, step).items()}
        history[eval_key].append(step)
        for k, v in out.items():
            history.setdefault(k, []).append(v)
        history["wall_time"].append(now())
        return out

    def default_postfix(metrics, hist):
        post = {}
        if "loss" in metrics:
            post["loss"] = f"{metrics['loss']:.4g}"
        if hist.get("test_acc"):
            post["test_acc"] = f"{hist['test_acc'][-1]:.4f}"
        return post

    postfix = postfix or default_postfix
    if evaluate is not None and eval_at_start and start == 0 and not history[eval_key]:
        run_eval(0)
    bar = progress(total=steps, initial=min(start, steps), desc=desc or what,
                   enabled=progress_bar)
    stopped = False
    done = start
    try:
        for step in range(start, steps):
            new, metrics = update(state, batch_fn(step, state))
            metrics = {k: _scalar(v) for k, v in metrics.items()}
            finite = metrics.pop("finite", None)
            finite = _all_finite(metrics) if finite is None else bool(finite)
            if not finite:
                kept = (f"The last good checkpoint ({ckpt}, {step_key} {saved[0]}) was kept."
                        if saved else "No checkpoint was written yet.")
                raise nan_error(step + 1, metrics, kept)
            state = new
            done = step + 1
            history[step_key].append(done)
            for k, v in metrics.items():
                history.setdefault(k, []).append(v)
            info = {step_key: done, "step": done, **metrics, "last": done == steps}
            if evaluate is not None and ((eval_every and done % eval_every == 0)
                                         or (eval_at_end and done == steps)):
                info.update(run_eval(done))
            if ckpt is not None and ((checkpoint_every and done % checkpoint_every == 0)
                                     or done == steps):
                save(done)
            bar.update(1)
            bar.set_postfix(postfix(metrics, history), refresh=False)
            if callback is not None:
                try:
                    stop = callback({**info, "state": state}) is STOP
                except StopRun:
                    stop = True
                if stop and done < steps:
                    stopped = True
                    if not saved or saved[0] != done:
                        save(done)
                    break
    finally:
        bar.close()
    if (not stopped and evaluate is not None and eval_at_end
            and (not history[eval_key] or history[eval_key][-1] != steps) and done == steps):
        run_eval(steps)
        save(steps)
    history["seconds"] = now()
    return LoopResult(state=state, history=history, step=done, seconds=history["seconds"],
                      stopped=stopped, resumed_from=start)
