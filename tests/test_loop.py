"""kipnb.loop: the shared long-run driver on a tiny optax problem (no kernels, fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kipnb import checkpoint, loop
from kipnb.checkpoint import CheckpointError

OPT = optax.adam(0.1)
TARGET = np.linspace(-1.0, 1.0, 5).astype(np.float32)


@jax.jit
def _step(params, opt_state, batch):
    def loss_fn(p):
        return jnp.mean((p * batch["x"] - batch["y"]) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(params)
    u, opt_state = OPT.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss


def init():
    params = jnp.zeros(5)
    return {"params": params, "opt": OPT.init(params)}


def update(state, batch):
    p, o, loss = _step(state["params"], state["opt"], batch)
    return {"params": p, "opt": o}, {"loss": loss, "finite": jnp.isfinite(loss)}


def batch_fn(step, state, poison_at=None):
    rng = np.random.default_rng([7, step])
    x = rng.normal(size=5).astype(np.float32)
    if step == poison_at:
        x[0] = np.nan
    return {"x": jnp.asarray(x), "y": jnp.asarray(TARGET * x)}


def evaluate(state, step):
    return {"test_err": float(jnp.sum((state["params"] - TARGET) ** 2))}


def _run(steps, ckpt=None, **kw):
    kw.setdefault("batch_fn", batch_fn)
    return loop.run(init(), update, steps, checkpoint_path=ckpt, checkpoint_every=3,
                    config={"lr": 0.1, "steps": steps}, free=("steps",), fingerprint="toy",
                    evaluate=evaluate, eval_every=4, eval_at_start=True, eval_at_end=True,
                    progress_bar=False, what="toy", **kw)


def test_learns_and_records_history():
    res = _run(20)
    h = res.history
    assert h["step"] == list(range(1, 21)) and len(h["loss"]) == 20
    assert h["eval_step"] == [0, 4, 8, 12, 16, 20] and len(h["wall_time"]) == 6
    assert h["test_err"][-1] < 0.2 * h["test_err"][0]  # it learns
    assert res.step == 20 and not res.stopped and res.seconds == h["seconds"] > 0


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = _run(10)
    ckpt = tmp_path / "c.npz"

    def stop_at_5(info):
        if info["step"] == 5:
            raise KeyboardInterrupt  # a kill after step 5; the checkpoint holds step 3

    with pytest.raises(KeyboardInterrupt):
        _run(10, ckpt, callback=stop_at_5)
    assert checkpoint.read_meta(ckpt)["step"] == 3
    resumed = _run(10, ckpt)
    assert resumed.resumed_from == 3
    np.testing.assert_array_equal(resumed.state["params"], straight.state["params"])
    for k in ("step", "loss", "eval_step", "test_err"):
        assert resumed.history[k] == straight.history[k], k
    # finished: started again, nothing reruns; a larger `steps` continues exactly
    again = _run(10, ckpt)
    np.testing.assert_array_equal(again.state["params"], straight.state["params"])
    assert again.history["loss"] == straight.history["loss"]
    longer = _run(14, ckpt)
    np.testing.assert_array_equal(longer.state["params"], _run(14).state["params"])


def test_other_config_is_refused_and_the_file_kept(tmp_path):
    ckpt = tmp_path / "c.npz"
    _run(3, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match=r"another toy run \(lr: 0.1 in the checkpoint, "
                                              r"0.2 now\).*left in place"):
        loop.run(init(), update, 3, checkpoint_path=ckpt, config={"lr": 0.2, "steps": 3},
                 free=("steps",), fingerprint="toy", progress_bar=False, what="toy")
    with pytest.raises(CheckpointError, match="other data"):
        loop.run(init(), update, 3, checkpoint_path=ckpt, config={"lr": 0.1, "steps": 3},
                 free=("steps",), fingerprint="else", progress_bar=False, what="toy",
                 data_why="other data")
    assert ckpt.read_bytes() == before


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "c.npz"
    with pytest.raises(loop.NumericalError,
                       match=r"Step 8: .*NaN/Inf.*not applied. The last good checkpoint "
                             r"\(.*c.npz, step 6\) was kept.*learning rate"):
        _run(10, ckpt, batch_fn=lambda s, st: batch_fn(s, st, poison_at=7))
    meta = checkpoint.read_meta(ckpt)
    assert meta["step"] == 6 and len(meta["history"]["loss"]) == 6
    assert np.all(np.isfinite(meta["history"]["loss"]))


def test_nan_error_is_the_methods_and_without_checkpoint_says_so():
    class MyError(FloatingPointError):
        pass

    def bad(step, metrics, kept):
        return MyError(f"mine at {step}: {kept} Fix: lower lr.")

    with pytest.raises(MyError, match="mine at 2: No checkpoint was written yet. Fix"):
        _run(5, nan_error=bad, batch_fn=lambda s, st: batch_fn(s, st, poison_at=1))


def test_nan_without_a_finite_entry_checks_the_metrics():
    def update_no_flag(state, batch):
        new, m = update(state, batch)
        return new, {"loss": m["loss"]}

    with pytest.raises(loop.NumericalError, match="Step 3"):
        loop.run(init(), update_no_flag, 5, progress_bar=False,
                 batch_fn=lambda s, st: batch_fn(s, st, poison_at=2))


@pytest.mark.parametrize("how", ["return", "raise"])
def test_callback_stops_early_with_a_checkpoint(tmp_path, how):
    ckpt = tmp_path / "c.npz"
    seen = []

    def cb(info):
        seen.append(info)
        if info["step"] == 4:
            if how == "raise":
                raise loop.StopRun
            return loop.STOP
        return (None, "a truthy value does not stop")

    res = _run(10, ckpt, callback=cb)
    assert res.stopped and res.step == 4 and res.history["step"] == [1, 2, 3, 4]
    assert [i["step"] for i in seen] == [1, 2, 3, 4]
    assert "test_err" in seen[3] and "test_err" not in seen[2]  # evaluation steps
    assert seen[0]["state"]["params"].shape == (5,) and not seen[0]["last"]
    assert checkpoint.read_meta(ckpt)["step"] == 4  # saved before stopping
    resumed = _run(10, ckpt)
    np.testing.assert_array_equal(resumed.state["params"], _run(10).state["params"])


def test_progress_off_prints_nothing_and_on_shows_a_bar(capsys):
    _run(3)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    loop.run(init(), update, 3, batch_fn=batch_fn, progress_bar=True, desc="toybar")
    assert "toybar" in capsys.readouterr().err
    assert list(loop.progress(range(3), enabled=False)) == [0, 1, 2]


def test_pack_unpack_choose_what_is_saved(tmp_path):
    ckpt = tmp_path / "c.npz"
    extra = {"count": 0}

    def pack(s):
        return {"p": s["params"], "o": s["opt"], "count": np.asarray(extra["count"])}

    def unpack(t):
        extra["count"] = int(t["count"])
        return {"params": jnp.asarray(t["p"]), "opt": jax.tree_util.tree_map(jnp.asarray, t["o"])}

    def counting(state, batch):
        extra["count"] += 1
        return update(state, batch)

    loop.run(init(), counting, 3, batch_fn=batch_fn, checkpoint_path=ckpt, progress_bar=False,
             pack=pack, unpack=unpack, step_key="iteration")
    assert checkpoint.read_meta(ckpt)["iteration"] == 3
    extra["count"] = -100
    res = loop.run(init(), counting, 5, batch_fn=batch_fn, checkpoint_path=ckpt,
                   progress_bar=False, pack=pack, unpack=unpack, step_key="iteration")
    assert extra["count"] == 5 and res.history["iteration"] == [1, 2, 3, 4, 5]
