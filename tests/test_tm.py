"""Trajectory matching (kipnb.tm): the loss, the two student loops, DATM's window and
labels, runs, checkpoints and errors -- on tiny data and tiny experts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kipnb import experts, nets, preprocess, tm
from kipnb.checkpoint import CheckpointError

SIZE = 12


def _tiny_data(n_per_class=12, n_test_per_class=6, seed=0) -> experts.TMData:
    """Ten classes of 12x12x1 images: a bright square at a class-dependent place, plus noise."""
    rng = np.random.default_rng(seed)

    def make(m):
        y = np.repeat(np.arange(10), m).astype(np.int32)
        x = rng.normal(0.0, 0.3, (len(y), SIZE, SIZE, 1)).astype(np.float32)
        for i, c in enumerate(y):
            r, q = divmod(int(c), 5)
            x[i, 1 + 5 * r:5 + 5 * r, 1 + 2 * q:3 + 2 * q, 0] += 2.0
        return x, y

    x_tr, y_tr = make(n_per_class)
    x_te, y_te = make(n_test_per_class)
    t = preprocess.make("standardize").fit(x_tr)
    return experts.TMData(
        x_train=np.asarray(t.apply(x_tr), np.float32), y_train=y_tr,
        x_test=np.asarray(t.apply(x_te), np.float32), y_test=y_te, transform=t,
        class_names=tuple(str(i) for i in range(10)), dataset="fashion_mnist",
    )


EXPERT_CFG = experts.ExpertConfig(width=6, depth=2, num_experts=2, epochs=4, batch_size=32,
                                  lr=0.05)
EVAL = experts.EvalConfig(epochs=20, num_seeds=2, batch_size=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = _tiny_data()
    traj = experts.train_experts(EXPERT_CFG, d, tmp_path_factory.mktemp("experts"),
                                 progress=False)
    return d, traj


def _cfg(**kw) -> tm.TMConfig:
    base = dict(ipc=1, iterations=4, syn_steps=3, expert_epochs=1, max_start_epoch=2,
                lr_img=10.0, evaluation=EVAL, eval_at_end=False, loop="python",
                checkpoint_every=1, augment="crop_flip")  # cheap to compile
    return tm.TMConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="dc"), "Unknown method 'dc'"),
        (dict(init="kmeans"), "Unknown init 'kmeans'"),
        (dict(loop="vmap"), "Unknown loop 'vmap'"),
        (dict(min_start_epoch=3, max_start_epoch=3), r"min_start_epoch \(3\) must be below"),
        (dict(current_max_start_epoch=5, max_start_epoch=4), "current_max_start_epoch must be"),
        (dict(syn_steps=0), "syn_steps must be a positive integer"),
        (dict(lr_img=-1.0), "lr_img must be a positive number"),
        (dict(momentum_img=1.0), r"momentum_img must be in \[0, 1\)"),
        (dict(augment="color_blur"), "Unknown augmentation"),
        (dict(threshold=0), "threshold must be a positive number"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tm.TMConfig(**kw)


def test_datm_defaults_and_parameter_sets():
    c = tm.TMConfig(method="datm")
    assert c.soft_labels is True and c.init == "correct"
    m = tm.TMConfig()
    assert m.soft_labels is False and m.init == "real"
    for name in tm.PARAMETER_SETS:
        ex, cfg = tm.distill_setting(name)
        assert cfg.method == name.split("_")[0]
        assert cfg.max_start_epoch - 1 + cfg.expert_epochs <= ex.epochs, name
    ex, cfg = tm.distill_setting("datm_cifar10_ipc1")
    assert (cfg.current_max_start_epoch, cfg.max_start_epoch, cfg.syn_steps) == (2, 4, 80)
    assert ex.preprocessing == "zca_kornia" and ex.width == 128
    ex, cfg = tm.distill_setting("mtt_fashion_ipc1", iterations=7, expert_epochs=1,
                                 expert_num_experts=2)
    assert cfg.iterations == 7 and ex.num_experts == 2
    with pytest.raises(ValueError, match="Unknown parameter set"):
        tm.distill_setting("mtt_svhn_ipc1")


def test_start_epoch_window_grows_like_datm():
    c = tm.TMConfig(method="datm", min_start_epoch=0, current_max_start_epoch=10,
                    max_start_epoch=20, expansion_end=1000)
    assert tm.start_epoch_window(c, 0) == (0, 10)
    assert tm.start_epoch_window(c, 500) == (0, 15)
    assert tm.start_epoch_window(c, 999) == (0, 19)
    assert tm.start_epoch_window(c, 1000) == (0, 20)
    assert tm.start_epoch_window(c, 5000) == (0, 20)
    assert tm.start_epoch_window(tm.TMConfig(max_start_epoch=7), 123) == (0, 7)


def test_minibatches_are_permutation_chunks():
    idx = tm._minibatches(np.random.default_rng(0), 10, 4, 5)
    assert idx.shape == (5, 4)
    first, second = idx[:2].ravel(), idx[2:4].ravel()
    assert len(set(first)) == 8 and len(set(second)) == 8  # no repeats inside one permutation


# ------------------------------------------------------------------------ the loss


def _loss_setup(dtype=jnp.float64):
    net = nets.ConvNet(width=5, depth=2, first_padding=1)
    tmpl = net.init(jax.random.PRNGKey(0), (SIZE, SIZE, 1), dtype)
    flat = nets.flatten_params(tmpl)
    im = jax.random.normal(jax.random.PRNGKey(1), (10, SIZE, SIZE, 1), dtype)
    idx = jnp.asarray(tm._minibatches(np.random.default_rng(0), 10, 4, 5))
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    return net, tmpl, flat, im, idx, keys


@pytest.mark.parametrize("soft, strategy", [(False, "crop_flip"), (True, None)])
def test_scan_and_python_loops_agree(soft, strategy):
    with jax.enable_x64(True):
        net, tmpl, flat, im, idx, keys = _loss_setup()
        lab = jnp.eye(10, dtype=jnp.float64) * 3.0
        target = flat + 0.01 * jax.random.normal(jax.random.PRNGKey(4), flat.shape, jnp.float64)
        out = {}
        for loop in ("scan", "python"):
            m = tm._Matcher(net, tmpl, _cfg(loop=loop, soft_labels=soft, syn_steps=5,
                                            augment=strategy or tm.TMConfig().augment))
            out[loop] = m(im, lab, jnp.asarray(0.05, jnp.float64), flat, target, idx, keys)
        np.testing.assert_allclose(out["scan"][0], out["python"][0], rtol=1e-12)
        for a, b in zip(out["scan"][1], out["python"][1], strict=True):
            assert float(jnp.max(jnp.abs(a))) > 0 or not soft
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(a)) + 1))


def test_loss_is_zero_at_the_students_own_endpoint_and_one_without_steps():
    with jax.enable_x64(True):
        net, tmpl, flat, im, idx, keys = _loss_setup()
        lab = jnp.eye(10, dtype=jnp.float64)
        step = tm._student_fns(net, tmpl, "crop_flip", False)
        w = flat
        for s in range(5):
            w = step(w, im, lab, 0.05, idx[s], keys[s])
        far = flat + 1.0
        assert float(tm.matching_loss(step, im, lab, 0.05, flat, w, idx, keys)) < 1e-20
        # lr = 0: the student does not move, so the loss is exactly ||start-target||^2 / same
        assert float(tm.matching_loss(step, im, lab, 0.0, flat, far, idx, keys)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- runs


def test_mtt_run_learns_images_and_lr(setup, tmp_path):
    d, traj = setup
    seen = []
    full_dsa = tm.TMConfig().augment  # MTT's whole DSA strategy in this one run
    res = tm.run(_cfg(iterations=5, eval_at_end=True, augment=full_dsa), d, traj,
                 progress=False, checkpoint_dir=tmp_path, callback=seen.append)
    assert res.images.shape == (10, SIZE, SIZE, 1)
    assert len(res.history["loss"]) == 5 and [i["iteration"] for i in seen] == [1, 2, 3, 4, 5]
    assert all(0 <= s < 2 for s in res.history["start_epoch"])
    assert res.lr != pytest.approx(0.01, abs=0)  # the student's lr is learned
    init = tm.init_synthetic(_cfg(), d, traj)
    assert np.abs(res.images - init).max() > 1e-4  # the images moved
    ds = res.distilled
    assert ds.method == "mtt" and ds.labels.tolist() == list(range(10))
    np.testing.assert_array_equal(ds.images, res.images)
    np.testing.assert_allclose(d.transform.apply(ds.to_pixels()), res.images, atol=1e-4)
    assert ds.lr == pytest.approx(res.lr) and ds.label_kind == "class"
    assert ds.classes.tolist() == list(range(10)) and ds.num_classes == 10
    assert res.evaluation is not None and len(res.evaluation.accuracies) == 2
    assert res.history["test_acc"] == [res.evaluation.mean]
    assert (tmp_path / tm.CHECKPOINT_NAME).exists()
    assert seen[-1]["last"] and seen[-1]["images"].shape == (10, SIZE, SIZE, 1)
    np.testing.assert_allclose(np.asarray(seen[-1]["images"]), res.images)
    again = tm.run(_cfg(iterations=5, eval_at_end=True, augment=full_dsa), d, traj,
                   progress=False, checkpoint_dir=tmp_path)  # finished: nothing reruns, the evaluation is kept
    assert again.evaluation == res.evaluation and again.distilled.extra["test_acc"] == res.evaluation.mean
    np.testing.assert_array_equal(again.images, res.images)


def test_real_init_takes_real_images_of_each_class(setup):
    d, traj = setup
    x = tm.init_synthetic(_cfg(ipc=2), d, traj)
    flat_train = d.x_train.reshape(len(d.x_train), -1)
    for i, img in enumerate(x):
        j = int(np.argmin(np.abs(flat_train - img.ravel()).sum(1)))
        np.testing.assert_array_equal(d.x_train[j], img)
        assert d.y_train[j] == i // 2
    noise = tm.init_synthetic(_cfg(init="noise"), d, traj)
    assert noise.shape == (10, SIZE, SIZE, 1) and abs(float(noise.std()) - 1) < 0.2


def test_datm_correct_init_and_soft_labels(setup):
    d, traj = setup
    cfg = _cfg(method="datm", iterations=3, current_max_start_epoch=1, max_start_epoch=2,
               expansion_end=2, lr_label=1.0)
    x = tm.init_synthetic(cfg, d, traj)
    classes = np.repeat(np.arange(10), 1)
    params = nets.unflatten_params(jnp.asarray(traj.params[0, -1]), traj.template)
    pred = np.asarray(traj.net.apply(params, jnp.asarray(x))).argmax(1)
    np.testing.assert_array_equal(pred, classes)  # the first expert gets them all right
    labels = tm.init_labels(cfg, x, classes, traj)
    assert labels.shape == (10, 10)
    np.testing.assert_array_equal(labels.argmax(1), classes)
    all_logits = np.stack([np.asarray(traj.net.apply(
        nets.unflatten_params(jnp.asarray(traj.params[e, -1]), traj.template), jnp.asarray(x)))
        for e in range(traj.num_experts)])
    ok = all_logits.argmax(-1) == classes
    expect = (all_logits * ok[..., None]).sum(0) / ok.sum(0)[:, None]
    np.testing.assert_allclose(labels, expect, rtol=1e-5)
    res = tm.run(cfg, d, traj, progress=False)
    assert res.history["window_hi"] == [1, 1, 2]
    assert res.distilled.labels.shape == (10, 10) and res.distilled.label_kind == "logits"
    assert np.abs(res.labels - labels).max() > 0  # the soft labels are learned


def test_threshold_skips_updates(setup):
    d, traj = setup
    res = tm.run(_cfg(threshold=1e-9, iterations=2), d, traj, progress=False)
    assert res.history["skipped"] == [True, True]
    np.testing.assert_array_equal(res.images, tm.init_synthetic(_cfg(), d, traj))
    assert res.lr == pytest.approx(0.01)


def test_resume_is_exact_and_mismatch_is_refused(setup, tmp_path):
    d, traj = setup
    cfg = _cfg(iterations=4)
    full = tm.run(cfg, d, traj, progress=False)

    def stop(info):
        if info["iteration"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tm.run(cfg, d, traj, progress=False, checkpoint_dir=tmp_path, callback=stop)
    part = tm.run(dataclasses.replace(cfg, iterations=3), d, traj, progress=False,
                  checkpoint_dir=tmp_path)
    assert len(part.history["loss"]) == 3
    resumed = tm.run(cfg, d, traj, progress=False, checkpoint_dir=tmp_path)  # extends to 4
    np.testing.assert_array_equal(resumed.images, full.images)
    assert resumed.lr == full.lr
    assert resumed.history["loss"] == full.history["loss"]

    before = (tmp_path / tm.CHECKPOINT_NAME).read_bytes()
    with pytest.raises(CheckpointError, match=r"syn_steps: 3 in the checkpoint, 2 now.*left in place"):
        tm.run(dataclasses.replace(cfg, syn_steps=2), d, traj, progress=False,
               checkpoint_dir=tmp_path)
    assert (tmp_path / tm.CHECKPOINT_NAME).read_bytes() == before


def test_nan_stops_with_a_clear_error(setup, tmp_path):
    d, traj = setup
    with pytest.raises(tm.TMNumericalError, match=r"iteration 1: .*NaN/Inf.*lower lr_img"):
        tm.run(_cfg(lr_teacher=1e30), d, traj, progress=False, checkpoint_dir=tmp_path)
    assert not (tmp_path / tm.CHECKPOINT_NAME).exists()


def test_experts_too_short_for_the_window(setup):
    d, traj = setup
    with pytest.raises(ValueError, match=r"trained for 4 epochs.*Lower max_start_epoch to <= 3"):
        tm.run(_cfg(max_start_epoch=4, expert_epochs=2), d, traj, progress=False)
    with pytest.raises(ValueError, match="batch_syn=11 exceeds the 10"):
        tm.run(_cfg(batch_syn=11), d, traj, progress=False)


def test_own_loop_over_init_and_update_equals_run(setup):
    """tm.run is kipnb.loop over tm.init / iteration_batch / update: the same images, lr
    and losses from a hand-written loop over the public step functions."""
    d, traj = setup
    cfg = _cfg(iterations=3)
    res = tm.run(cfg, d, traj, progress=False)
    state, losses = tm.init(cfg, d, traj), []
    assert isinstance(state, tm.TMState) and state.images.shape == (10, SIZE, SIZE, 1)
    for it in range(cfg.iterations):
        batch = tm.iteration_batch(cfg, traj, it, state)
        assert batch.idx.shape == (cfg.syn_steps, 10) and 0 <= batch.start_epoch < 2
        state, m = tm.update(cfg, traj, state, batch)
        assert m["finite"] and m["lr"] == float(state.lr)
        losses.append(m["loss"])
    assert losses == res.history["loss"]
    np.testing.assert_array_equal(np.asarray(state.images), res.images)
    assert float(state.lr) == res.lr
