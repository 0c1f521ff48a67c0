"""kipnb.kip and kipnb.checkpoint: the loss, learning, exact resume, errors, CIFAR path."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_cifar

from kipnb import checkpoint, kip, krr, stax, viz
from kipnb.checkpoint import CheckpointError
from kipnb.distilled import DistilledSet

ROOT = Path(__file__).resolve().parents[1]
TINY = kip.KIPConfig(dataset="digits", arch="fc", depth=2, ipc=2, steps=6,
                     learning_rate=0.01, target_batch_size=200, eval_every=3,
                     eval_test_size=200, checkpoint_every=2)


@pytest.fixture(scope="module")
def digits():
    return kip.prepare("digits")


def _same_support(a: kip.KIPResult, b: kip.KIPResult):
    for k in ("images", "labels"):
        np.testing.assert_array_equal(a.support[k], b.support[k])


# ------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,value,match", [
    ("arch", "resnet", "unknown architecture"),
    ("get", "both", "'ntk' or 'nngp'"),
    ("ipc", 0, "positive integer"),
    ("learning_rate", 0.0, "positive"),
    ("reg", 0.0, "ridge"),
    ("target_sampling", "random", "class_balanced"),
    ("preprocessing", "whiten", "standardize"),
    ("init", "zeros", "'real' or 'noise'"),
    ("eval_every", -1, "non-negative"),
])
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **{field: value})


def test_config_needs_something_to_learn():
    with pytest.raises(ValueError, match="nothing to learn"):
        dataclasses.replace(TINY, learn_images=False, learn_labels=False)


def test_float64_needs_x64(digits):
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on in this session")
    with pytest.raises(ValueError, match="jax_enable_x64"):
        kip.run(dataclasses.replace(TINY, float64=True), digits, progress=False)


def test_impossible_ipc_names_the_class(digits):
    with pytest.raises(ValueError, match=r"Cannot start KIP with 500 images per class.*ipc <="):
        kip.run(dataclasses.replace(TINY, ipc=500), digits, progress=False)


def test_data_for_another_dataset_is_refused(digits):
    with pytest.raises(ValueError, match="config.dataset is 'fashion_mnist'"):
        kip.run(dataclasses.replace(TINY, dataset="fashion_mnist"), digits, progress=False)


# ---------------------------------------------------------------------------- loss


def test_loss_is_half_mse_of_krr_predictions(digits):
    kernel_fn = kip.kernel_for(TINY, 10)
    x_s, x_t = jnp.asarray(digits.x_train[:20]), jnp.asarray(digits.x_train[20:120])
    y_s = krr.one_hot_targets(digits.labels_train[:20], 10)
    y_t = krr.one_hot_targets(digits.labels_train[20:120], 10)
    loss, acc = kip.kip_loss(kernel_fn, "ntk", 1e-6, x_s, y_s, x_t, y_t)
    pred = krr.krr(kernel_fn(x_s, x_s, "ntk"), kernel_fn(x_t, x_s, "ntk"), y_s, 1e-6)
    np.testing.assert_allclose(float(loss), 0.5 * float(jnp.mean((pred - y_t) ** 2)), rtol=1e-5)
    np.testing.assert_allclose(float(acc), float(krr.accuracy(pred, y_t)))
    w = jnp.full((100,), 2.0)
    loss_w, _ = kip.kip_loss(kernel_fn, "ntk", 1e-6, x_s, y_s, x_t, y_t, w)
    np.testing.assert_allclose(float(loss_w), 2 * float(loss), rtol=1e-6)


def test_target_batches_are_class_balanced_and_depend_only_on_seed_and_step(digits):
    by_class = kip._class_index(digits.labels_train, 10)
    n = len(digits.labels_train)
    a = kip._target_indices(TINY, 5, by_class, n)
    assert len(a) == 200 and len(np.unique(a)) == 200
    np.testing.assert_array_equal(np.bincount(digits.labels_train[a], minlength=10), 20)
    np.testing.assert_array_equal(a, kip._target_indices(TINY, 5, by_class, n))
    assert not np.array_equal(a, kip._target_indices(TINY, 6, by_class, n))
    u = kip._target_indices(dataclasses.replace(TINY, target_sampling="uniform"), 5, by_class, n)
    assert len(np.unique(u)) == 200 and np.bincount(digits.labels_train[u]).std() > 0
    full = kip._target_indices(dataclasses.replace(TINY, target_batch_size=10**6), 0, by_class, n)
    np.testing.assert_array_equal(full, np.arange(n))


# ------------------------------------------------------------------------ learning


def test_kip_learns_and_beats_its_initialization(digits):
    cfg = dataclasses.replace(TINY, ipc=1, steps=60, learning_rate=0.02, eval_every=30,
                              eval_test_size=None)
    r = kip.run(cfg, digits, progress=False)
    h = r.history
    assert h["eval_step"] == [0, 30, 60] and len(h["loss"]) == 60
    assert np.mean(h["loss"][-10:]) < 0.7 * np.mean(h["loss"][:5]), h["loss"]
    assert h["test_acc"][-1] > h["test_acc"][0] + 0.1, h["test_acc"]  # 10 images only
    assert h["test_acc"][-1] > 0.75
    # the learned labels moved away from centered one-hot, the images from the data
    one_hot = np.asarray(krr.one_hot_targets(np.argmax(r.support["labels"], 1), 10))
    assert np.abs(r.support["labels"] - one_hot).max() > 0.05
    ds = r.distilled
    assert ds.method == "kip" and ds.ipc == 1 and ds.images.shape == (10, 8, 8, 1)
    assert ds.extra["test_acc"] == h["test_acc"][-1]
    # format 2: the exact model-space images, the data's transform, regression labels
    np.testing.assert_array_equal(ds.images, r.support["images"])
    np.testing.assert_allclose(digits.transform.apply(ds.to_pixels()), r.support["images"],
                               atol=1e-4)
    assert ds.label_kind == "regression" and ds.transform is digits.transform
    assert ds.classes.tolist() == list(range(10)) and ds.lr is None
    assert ds.source["data_fingerprint"] == digits.fingerprint()
    acc = kip.evaluate_krr(r.support["images"], r.support["labels"], digits, arch="fc", depth=2)
    assert acc == pytest.approx(h["test_acc"][-1])


def test_fixed_labels_and_fixed_images(digits):
    r = kip.run(dataclasses.replace(TINY, learn_labels=False), digits, progress=False)
    one_hot = krr.one_hot_targets(np.repeat(np.arange(10), 2), 10)
    np.testing.assert_array_equal(r.support["labels"], one_hot)
    r2 = kip.run(dataclasses.replace(TINY, learn_images=False), digits, progress=False)
    r0 = kip.run(dataclasses.replace(TINY, steps=0), digits, progress=False)
    np.testing.assert_array_equal(r2.support["images"], r0.support["images"])
    assert not np.array_equal(r2.support["labels"], r0.support["labels"])


def test_a_sampler_giving_the_default_batches_gives_the_same_run(digits):
    by_class = kip._class_index(digits.labels_train, 10)
    n = len(digits.labels_train)

    class Same:
        calls = 0

        def sample(self, step, support):
            Same.calls += 1
            assert set(support) == {"images", "labels"}
            return kip._target_indices(TINY, step, by_class, n), None

    a = kip.run(TINY, digits, progress=False)
    b = kip.run(TINY, digits, progress=False, batch_sampler=Same())
    assert Same.calls == TINY.steps
    _same_support(a, b)


def test_callback_and_live_plot(digits):
    seen = []
    plot = viz.LivePlot(every=2)
    kip.run(TINY, digits, progress=False, callback=lambda i: (seen.append(i), plot(i)))
    assert [i["step"] for i in seen] == list(range(1, 7)) and seen[-1]["last"]
    assert [i["step"] for i in seen if "test_acc" in i] == [3, 6]
    assert plot.history["loss"][0] == list(range(1, 7))
    assert plot.history["test_acc"][0] == [3, 6]
    fig = plot.figure()
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "loss"


def test_conv_kernel_kip_runs(digits):
    cfg = dataclasses.replace(TINY, arch="conv", depth=1, ipc=1, steps=2, target_batch_size=50,
                              eval_test_size=50)
    r = kip.run(cfg, digits, progress=False)
    assert np.isfinite(r.history["loss"]).all() and r.support["images"].shape == (10, 8, 8, 1)


# -------------------------------------------------------------- checkpoint, resume


_KILLED_RUN = """
import os, signal, sys
from kipnb import kip
cfg, d = {cfg!r}, kip.prepare("digits")
def die(info):
    if info["step"] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
kip.run(cfg, d, checkpoint_dir=sys.argv[1], progress=False, callback=die)
"""


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(digits, tmp_path):
    cfg = TINY
    straight = kip.run(cfg, digits, progress=False)
    script = _KILLED_RUN.replace("{cfg!r}", "kip." + repr(cfg))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # it really was killed
    ckpt = tmp_path / kip.CHECKPOINT_NAME
    assert checkpoint.read_meta(ckpt)["step"] == 4  # checkpoints every 2 steps
    resumed = kip.run(cfg, digits, checkpoint_dir=tmp_path, progress=False)
    _same_support(straight, resumed)
    for k in ("step", "loss", "batch_acc", "eval_step", "test_acc"):
        assert resumed.history[k] == straight.history[k], k
    assert checkpoint.read_meta(ckpt)["step"] == 6
    # a finished run started again returns the same set without stepping
    again = kip.run(cfg, digits, checkpoint_dir=tmp_path, progress=False)
    _same_support(straight, again)
    # raising `steps` continues it; that equals an uninterrupted longer run
    longer = dataclasses.replace(cfg, steps=8)
    cont = kip.run(longer, digits, checkpoint_dir=tmp_path, progress=False)
    _same_support(cont, kip.run(longer, digits, progress=False))


def test_checkpoint_of_another_config_is_refused_and_kept(digits, tmp_path):
    kip.run(TINY, digits, checkpoint_dir=tmp_path, progress=False)
    ckpt = tmp_path / kip.CHECKPOINT_NAME
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match=r"learning_rate: 0.01 in the checkpoint, 0.02 now"):
        kip.run(dataclasses.replace(TINY, learning_rate=0.02), digits, checkpoint_dir=tmp_path,
                progress=False)
    assert ckpt.read_bytes() == before


def test_corrupted_checkpoint_is_reported_and_kept(digits, tmp_path):
    ckpt = tmp_path / kip.CHECKPOINT_NAME
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="could not be read.*left in place"):
        kip.run(TINY, digits, checkpoint_dir=tmp_path, progress=False)
    assert ckpt.read_bytes() == b"PK\x03\x04 truncated"


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    by_class = kip._class_index(digits.labels_train, 10)

    class PoisonAt4:
        def sample(self, step, support):
            idx = kip._target_indices(TINY, step, by_class, 1348)
            w = np.ones(len(idx))
            if step == 3:  # the 4th step
                w[0] = np.nan
            return idx, w

    with pytest.raises(kip.KIPNumericalError,
                       match=r"step 4: the loss or its gradient is NaN.*step 2\) was kept.*reg"):
        kip.run(TINY, digits, checkpoint_dir=tmp_path, progress=False, batch_sampler=PoisonAt4())
    meta = checkpoint.read_meta(tmp_path / kip.CHECKPOINT_NAME)
    assert meta["step"] == 2 and all(np.isfinite(meta["history"]["loss"]))


def test_checkpoint_roundtrip_and_shape_check(tmp_path):
    tree = {"a": np.arange(3.0, dtype=np.float32), "b": (np.int32(7), np.ones((2, 2)))}
    p = checkpoint.save(tmp_path / "c.npz", tree, {"step": 3})
    out, meta = checkpoint.load(p, tree)
    assert meta == {"step": 3}
    np.testing.assert_array_equal(out["b"][1], tree["b"][1])
    bad = {"a": np.zeros(4, np.float32), "b": tree["b"]}
    with pytest.raises(CheckpointError, match=r"float32\[3\].*needs float32\[4\]"):
        checkpoint.load(p, bad)
    with pytest.raises(CheckpointError, match="holds 3 arrays but this run's state has 1"):
        checkpoint.load(p, {"a": tree["a"]})


# -------------------------------------------------------------------------- CIFAR


def test_cifar10_colab_parameter_set_runs_on_cifar_format_files(tmp_path):
    write_cifar(tmp_path, "cifar10", extracted=True, n_per_batch=30)
    base = kip.PARAMETER_SETS["cifar10_kip_colab"]
    assert (base.arch, base.depth, base.ipc * 10, base.learning_rate, base.target_batch_size,
            base.steps) == ("fc", 1, 100, 0.04, 5000, 300)
    cfg = dataclasses.replace(base, ipc=1, steps=3, target_batch_size=40, eval_every=3)
    d = kip.prepare(cfg, data_dir=tmp_path)
    assert d.x_train.shape == (150, 32, 32, 3)
    r = kip.run(cfg, d, progress=False)
    assert r.distilled.images.shape == (10, 32, 32, 3) and r.distilled.dataset == "cifar10"
    assert np.isfinite(r.history["loss"]).all() and len(r.history["test_acc"]) == 2
    path = r.distilled.save(tmp_path / "kip.npz")
    back = DistilledSet.load(path)
    np.testing.assert_array_equal(back.images, r.support["images"])
    assert back.source["config"]["learning_rate"] == 0.04


def test_given_initial_support_is_used_and_checked(digits, tmp_path):
    idx = np.array([np.flatnonzero(digits.labels_train == c)[-1] for c in range(10)])
    initial = {"images": digits.x_train[idx],
               "labels": np.asarray(krr.one_hot_targets(np.arange(10), 10))}
    cfg = dataclasses.replace(TINY, ipc=1, steps=0)
    r = kip.run(cfg, digits, initial=initial, progress=False)
    np.testing.assert_array_equal(r.support["images"], digits.x_train[idx])
    with pytest.raises(ValueError, match=r"initial labels must be \(n, C\) = \(10, 10\)"):
        kip.run(cfg, digits, initial={**initial, "labels": initial["labels"][:, :3]},
                progress=False)
    with pytest.raises(ValueError, match="initial images must be"):
        kip.run(cfg, digits, initial={**initial, "images": initial["images"][:, :4]},
                progress=False)
    kip.run(dataclasses.replace(cfg, steps=2), digits, initial=initial, checkpoint_dir=tmp_path,
            progress=False)
    with pytest.raises(CheckpointError, match="initial support differ"):
        kip.run(dataclasses.replace(cfg, steps=2), digits, checkpoint_dir=tmp_path, progress=False)


def test_checkpoint_dir_for_separates_configs_but_not_step_counts(tmp_path):
    a = kip.checkpoint_dir_for(tmp_path, TINY)
    assert a.parent == tmp_path and a.name.startswith("kip_fc2_ipc2_")
    assert kip.checkpoint_dir_for(tmp_path, dataclasses.replace(TINY, steps=99)) == a
    assert kip.checkpoint_dir_for(tmp_path, dataclasses.replace(TINY, learning_rate=0.5)) != a


NT_KIP = ROOT / "tests" / "fixtures" / "nt_kip_fc1.npz"


def colab_fc1_kip(*args, **kwargs):
    """The colab's loop, from the same file the fixture script runs it from."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("colab_kip", ROOT / "scripts" / "colab_kip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.colab_fc1_kip(*args, **kwargs)


def test_colab_fc1_kip_run_matches_neural_tangents_float64():
    """The colab's FC-1 KIP loop, ported by one import, follows neural-tangents' losses."""
    ref = np.load(NT_KIP)
    assert "neural_tangents" in str(ref["versions"])
    with jax.enable_x64(True):
        losses, x_final = colab_fc1_kip(
            stax, ref["x_init"], ref["y_init"], ref["x_pool"], ref["y_pool"], ref["batches"],
            learning_rate=0.04)
    assert losses.shape == ref["losses"].shape == (15,)
    # the run learns (so the comparison is not of a constant) ...
    assert ref["losses"][-1] < 0.95 * ref["losses"][0]
    # ... and kipnb's trajectory is neural-tangents' to 1e-8 relative at every step
    np.testing.assert_allclose(losses, ref["losses"], rtol=1e-8, atol=0)
    assert np.max(np.abs(x_final - ref["x_final"])) < 1e-6 * np.max(np.abs(ref["x_final"]))


# ------------------------------------------------------- public step functions


def test_own_loop_over_init_and_update_equals_run(digits):
    """kip.run is kipnb.loop over kip.init / target_batch / update: a hand-written loop
    over the public step functions gives bit-identical support sets and losses."""
    cfg = dataclasses.replace(TINY, eval_every=0, steps=4)
    res = kip.run(cfg, digits, progress=False)
    state, losses = kip.init(cfg, digits), []
    assert isinstance(state, kip.KIPState) and set(state.trainable) == {"images", "labels"}
    for step in range(cfg.steps):
        batch = kip.target_batch(cfg, digits, step, state)
        assert batch.x.shape == (200, 8, 8, 1) and batch.weights is None
        state, m = kip.update(cfg, state, batch)
        assert bool(m["finite"])
        losses.append(float(m["loss"]))
    assert losses == res.history["loss"]
    for k in ("images", "labels"):
        np.testing.assert_array_equal(np.asarray(state.support[k]), res.support[k])
    fixed = kip.init(dataclasses.replace(cfg, learn_labels=False), digits)
    assert set(fixed.trainable) == {"images"} and set(fixed.fixed) == {"labels"}
    with pytest.raises(ValueError, match="needs the data"):
        kip.init(cfg)
