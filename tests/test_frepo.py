"""kipnb.frepo: learning, the model pool's resets, exact resume, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kipnb import checkpoint, evaluate, frepo, kip
from kipnb.checkpoint import CheckpointError
from kipnb.distilled import DistilledSet

TINY = frepo.FRePoConfig(dataset="digits", ipc=2, steps=24, width=16, pool_size=3,
                         max_online_steps=6, target_batch_size=200, eval_every=12,
                         eval_models=2, eval_test_size=300, checkpoint_every=6)


@pytest.fixture(scope="module")
def digits():
    return kip.prepare("digits")


@pytest.fixture(scope="module")
def full(digits):
    return frepo.run(TINY, digits, progress=False)


def test_config_errors():
    with pytest.raises(ValueError, match=r"FRePoConfig.norm='batch': use one of"):
        frepo.FRePoConfig(norm="batch")
    with pytest.raises(ValueError, match=r"FRePoConfig.pool_size=0: must be an integer >= 1"):
        frepo.FRePoConfig(pool_size=0)
    with pytest.raises(ValueError, match=r"FRePoConfig.online_learning_rate=-1: must be positive"):
        frepo.FRePoConfig(online_learning_rate=-1)
    with pytest.raises(ValueError, match=r"FRePoConfig.optimizer='sgd': use one of \['adam', 'lamb'\]"):
        frepo.FRePoConfig(optimizer="sgd")
    with pytest.raises(ValueError, match=r"FRePoConfig.first_padding=-1: must be an integer >= 0"):
        frepo.FRePoConfig(first_padding=-1)


def test_feature_krr_loss_is_zero_on_its_own_support():
    import jax.numpy as jnp

    f = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), jnp.float32)
    y = jnp.eye(5) - 0.2
    loss, acc = frepo.feature_krr_loss(f, y, f, y, reg=1e-7)
    assert float(loss) < 1e-6 and float(acc) == 1.0


def test_learns_resets_and_beats_chance(full, digits):
    loss = np.asarray(full.history["loss"])
    assert loss[-8:].mean() < loss[:8].mean()
    # 24 steps over 3 models, reset every 6 online steps: every model was reset
    assert min(full.distilled.extra["resets"]) >= 1
    assert set(full.history["model"]) == {0, 1, 2}
    ds = full.distilled
    assert ds.label_kind == "regression" and ds.source["method"] == "frepo"
    acc = evaluate.krr(ds, digits, kernel="fc").mean
    # measured 0.8; chance 0.1
    assert acc > 0.65


def test_exact_resume_and_save_load(full, digits, tmp_path):
    frepo.run(dataclasses.replace(TINY, steps=12), digits, checkpoint_dir=tmp_path,
              progress=False)
    resumed = frepo.run(TINY, digits, checkpoint_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(resumed.distilled.images, full.distilled.images)
    np.testing.assert_array_equal(resumed.distilled.labels, full.distilled.labels)
    assert resumed.history["loss"] == full.history["loss"]
    back = DistilledSet.load(resumed.distilled.save(tmp_path / "frepo.npz"))
    np.testing.assert_array_equal(back.labels, full.distilled.labels)
    with pytest.raises(CheckpointError, match="belongs to another FRePo run"):
        frepo.run(dataclasses.replace(TINY, pool_size=2), digits, checkpoint_dir=tmp_path,
                  progress=False)


def test_width_growth_is_frepo_own_conv_and_keeps_old_checkpoints_resumable(digits, tmp_path):
    assert frepo.PARAMETER_SETS["paper"].net().block_widths() == (128, 256, 512)
    # At its default, the field added later is not in the saved config: a checkpoint
    # written before it existed belongs to the same run.
    assert "width_growth" not in checkpoint.resumable_config(TINY)
    short = dataclasses.replace(TINY, steps=6, eval_every=0)
    grown = dataclasses.replace(short, width_growth=2)
    assert checkpoint.resumable_config(grown)["width_growth"] == 2
    res = frepo.run(grown, digits, checkpoint_dir=tmp_path, progress=False)
    assert np.isfinite(res.history["loss"]).all()
    assert res.distilled.source["config"]["width_growth"] == 2
    with pytest.raises(CheckpointError, match=r"width_growth: 2 in the checkpoint, None now"):
        frepo.run(short, digits, checkpoint_dir=tmp_path, progress=False)


def test_reference_settings_batchnorm_pool_and_lamb(digits, tmp_path):
    """The paper set's network and optimizer (yongchao97/FRePo): batch norm on the input of
    blocks 1 and 2 with running statistics per pool model, LAMB with a cosine decay."""
    paper = frepo.PARAMETER_SETS["paper"]
    net = paper.net(10, channels=1)
    assert (net.norm, net.norm_first, net.first_padding) == ("batchnorm", True, 3)
    assert paper.net(10, channels=3).first_padding == 1
    assert (paper.optimizer, paper.lr_decay_steps) == ("lamb", paper.steps)
    ref = dataclasses.replace(TINY, norm="batchnorm", norm_first=True, first_padding=None,
                              optimizer="lamb", lr_decay_steps=24, learning_rate=3e-2,
                              eval_every=0)
    res = frepo.run(ref, digits, checkpoint_dir=tmp_path, progress=False)
    bn = res.state["pool_bn"]
    assert sorted(bn) == ["block1", "block2"] and bn["block1"]["mean"].shape == (3, 16)
    # a model's running statistics move off (0, 1) as it trains, and a reset restores them
    age = np.asarray(res.state["age"])
    trained = int(np.argmax(age))
    assert age[trained] > 0 and float(np.abs(bn["block1"]["mean"][trained]).max()) > 1e-3
    loss = np.asarray(res.history["loss"])
    assert np.isfinite(loss).all() and loss[-6:].mean() < loss[:6].mean()
    acc = evaluate.krr(res.distilled, digits, kernel="fc").mean
    assert acc > 0.5  # chance 0.1
    # exact resume with the running statistics in the checkpoint
    other = tmp_path / "again"
    frepo.run(dataclasses.replace(ref, steps=12), digits, checkpoint_dir=other, progress=False)
    resumed = frepo.run(ref, digits, checkpoint_dir=other, progress=False)
    np.testing.assert_array_equal(resumed.distilled.images, res.distilled.images)
    np.testing.assert_array_equal(resumed.state["pool_bn"]["block2"]["var"], bn["block2"]["var"])
    assert "pool_bn" not in frepo.init(dataclasses.replace(TINY, steps=1), digits)


def test_nan_stops_with_a_message(digits):
    bad = dataclasses.replace(digits, x_train=np.full_like(digits.x_train, np.nan))
    with pytest.raises(frepo.FRePoNumericalError,
                       match=r"FRePo step 1: the loss or its gradient is NaN/Inf"):
        frepo.run(dataclasses.replace(TINY, eval_every=0), bad, progress=False)


def test_run_equals_a_hand_written_loop(digits):
    """frepo.run is kipnb.loop.run over the public init / update: the same set."""
    cfg = dataclasses.replace(TINY, steps=4, eval_every=0)
    res = frepo.run(cfg, digits, progress=False)
    state, models = frepo.init(cfg, digits), []
    for _ in range(cfg.steps):
        state, info = frepo.update(state, cfg, digits)
        models.append(info["model"])
    np.testing.assert_array_equal(np.asarray(state["params"]["images"]), res.distilled.images)
    assert models == res.history["model"]
    assert np.asarray(state["resets"]).tolist() == res.distilled.extra["resets"]
