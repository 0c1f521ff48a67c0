"""kipnb.experts: expert trajectories (files, exact resume, errors) and evaluation."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kipnb import checkpoint, data, experts, nets, train
from kipnb.checkpoint import CheckpointError

C = 4  # classes of the toy problem


def _patterns(n: int, size: int = 12, seed: int = 0, noise: float = 0.3):
    """Four classes of images that survive DSA augmentation: horizontal stripes, vertical
    stripes, a checkerboard, and no pattern; random phase and Gaussian noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    x = np.empty((n, size, size, 1), np.float32)
    for i in range(n):
        pr, pc = rng.integers(0, 4, 2)
        rows, cols = ((r + pr) // 2) % 2, ((c + pc) // 2) % 2
        img = [rows, cols, rows ^ cols, np.zeros_like(r)][y[i]].astype(np.float32) * 2.0 - 1.0
        if y[i] == 3:
            img[:] = 0.0
        x[i, ..., 0] = img + noise * rng.standard_normal((size, size))
    return x, y.astype(np.int32)


@pytest.fixture(scope="module")
def toy() -> experts.TMData:
    x_tr, y_tr = _patterns(64, seed=0)
    x_te, y_te = _patterns(200, seed=1)
    return experts.TMData(x_tr, y_tr, x_te, y_te, None, ("h", "v", "check", "flat"), "toy")


TINY = experts.ExpertConfig(dataset="toy", width=4, depth=2, num_experts=2, epochs=3,
                            batch_size=32, lr=0.05, preprocessing="none")


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """TINY trained without interruption: (directory, Trajectories)."""
    out = tmp_path_factory.mktemp("experts_a")
    return out, experts.train_experts(TINY, toy, out, progress=False)


def _snapshot_files(d):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


# ------------------------------------------------------------------------- configs


@pytest.mark.parametrize("field,value,match", [
    ("width", 0, r"ExpertConfig.width=0: must be a positive integer"),
    ("epochs", 2.5, r"ExpertConfig.epochs=2.5: must be a positive integer"),
    ("norm", "batchnorm", r"ExpertConfig.norm='batchnorm': use one of"),
    ("lr", 0.0, r"ExpertConfig.lr=0.0: must be a positive number"),
    ("lr", float("nan"), r"ExpertConfig.lr=nan"),
    ("momentum", 1.0, r"ExpertConfig.momentum=1.0: must lie in \[0, 1\)"),
    ("weight_decay", -1e-4, r"weight_decay.*>= 0"),
    ("augment", "crop_blur", r"ExpertConfig.augment='crop_blur'.*Unknown augmentation.*'blur'"),
    ("lr_decay", 1, r"ExpertConfig.lr_decay=1: must be True or False"),
    ("preprocessing", "whiten", r"ExpertConfig.preprocessing='whiten': use one of"),
    ("zca_reg", 0, r"ExpertConfig.zca_reg=0"),
    ("seed", -1, r"ExpertConfig.seed=-1"),
    ("dataset", "", r"ExpertConfig.dataset=''"),
])
def test_expert_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **{field: value})


@pytest.mark.parametrize("field,value,match", [
    ("epochs", 0, r"EvalConfig.epochs=0: must be a positive integer"),
    ("batch_size", None, r"EvalConfig.batch_size=None"),
    ("momentum", -0.1, r"EvalConfig.momentum=-0.1: must lie in \[0, 1\)"),
    ("augment", "zoom", r"EvalConfig.augment='zoom'"),
    ("num_seeds", 0, r"EvalConfig.num_seeds=0"),
])
def test_eval_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        experts.EvalConfig(**{field: value})


def test_net_pads_one_channel_images_as_mtt():
    cfg = experts.ExpertConfig(width=8)
    assert cfg.net((28, 28, 1), 10).first_padding == 3
    assert cfg.net((32, 32, 3), 10).first_padding == 1
    assert cfg.net((28, 28, 1), 10) == nets.ConvNet(width=8, num_classes=10, first_padding=3)
    with pytest.raises(ValueError, match="too small"):
        experts.ExpertConfig(depth=5).net((8, 8, 3), 10)
    # MTT's --decay: lr / 10 after the epoch with 0-based index epochs // 2 + 1
    dec = experts.ExpertConfig(epochs=6, lr=0.1, lr_decay=True)
    assert [dec.lr_at(e) for e in range(6)] == pytest.approx([0.1] * 5 + [0.01])
    assert experts.EvalConfig(epochs=10).lr_at(1.0, 6) == 1.0
    assert experts.EvalConfig(epochs=10).lr_at(1.0, 7) == pytest.approx(0.1)


def test_tmdata_checks_shapes_and_labels():
    x = np.zeros((4, 8, 8, 1))
    with pytest.raises(ValueError, match="NHWC"):
        experts.TMData(x[..., 0], np.zeros(4, int), x, np.zeros(4, int))
    with pytest.raises(ValueError, match=r"y_test must be \(4,\) integer classes"):
        experts.TMData(x, np.zeros(4, int), x, np.zeros(4))
    with pytest.raises(ValueError, match=r"spans \[0, 5\] but there are 2 classes"):
        experts.TMData(x, np.array([0, 1, 5, 0]), x, np.zeros(4, int), class_names=("a", "b"))
    d = experts.TMData(x, np.array([0, 1, 2, 0]), x, np.zeros(4, int))
    assert d.num_classes == 3 and d.image_shape == (8, 8, 1) and d.x_train.dtype == np.float32


def test_prepare_standardizes_or_whitens_like_mtt():
    d = experts.prepare("digits", n_train=300, n_test=50)
    assert isinstance(d, data.Data) and experts.TMData is data.Data
    assert d.x_train.shape == (300, 8, 8, 1) and d.x_test.shape == (50, 8, 8, 1)
    assert abs(float(d.x_train.mean())) < 1e-4 and d.num_classes == 10
    z = experts.prepare("digits", preprocessing="zca_kornia", zca_reg=0.1, n_train=300,
                        n_test=50)
    step = z.transform.steps[0]
    assert type(step).__name__ == "ZCA" and not step.relative and step.eps == 0.1
    assert len(z.transform.steps) == 1  # MTT whitens [0, 1] pixels, not standardized ones
    assert z.preprocessing == "zca_kornia"
    cfg = experts.ExpertConfig(dataset="digits", num_experts=1, epochs=1)
    with pytest.raises(ValueError, match="preprocessed as .*zca.*preprocessing='standardize'"):
        experts.train_experts(cfg, z, "unused", progress=False)
    # KIP's relative ZCA has another name; the experts' old spelling 'zca' is refused
    kip_zca = data.prepare("digits", "zca", n_train=300, n_test=50)
    assert kip_zca.transform.steps[0].relative and kip_zca.preprocessing == "zca"
    for call in (lambda: experts.prepare("digits", preprocessing="zca"),
                 lambda: experts.ExpertConfig(preprocessing="zca")):
        with pytest.raises(ValueError, match=r"'zca' is ambiguous.*'zca_kornia'.*relative"):
            call()
    with pytest.raises(ValueError, match="preprocessed as .*'relative': True.*'zca_kornia'"):
        experts.train_experts(dataclasses.replace(cfg, preprocessing="zca_kornia"), kip_zca,
                              "unused", progress=False)


def test_expert_files_written_with_the_old_zca_name_read_as_zca_kornia(tmp_path):
    meta = {"format": experts.FORMAT, "format_version": 1,
            "config": {**dataclasses.asdict(TINY), "preprocessing": "zca"}}
    path = tmp_path / "expert_000.npz"
    checkpoint.save(path, {"momentum": np.zeros(2, np.float32)}, meta)
    assert experts._read_meta(path)["config"]["preprocessing"] == "zca_kornia"


# --------------------------------------------------------------------- the SGD step


def test_sgd_matches_torch_sgd_by_hand():
    # torch.optim.SGD(lr, momentum=m, weight_decay=wd): g = grad + wd * p;
    # buf = g on the first step, m * buf + g after; p -= lr * buf
    lr, m, wd = 0.1, 0.9, 0.01
    p = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array([[0.5]])}}
    grads = [{"a": jnp.array([0.3, 0.1]), "b": {"c": jnp.array([[-1.0]])}},
             {"a": jnp.array([-0.2, 0.4]), "b": {"c": jnp.array([[2.0]])}}]
    opt = train.make_optimizer("sgd", lr, momentum=m, weight_decay=wd)
    state = train.init(p, opt)
    pa, pc, ba, bc = np.array([1.0, -2.0]), 0.5, None, None
    for g in grads:
        updates, opt_state = opt.update(g, state.opt_state, state.params)
        state = train.TrainState(optax.apply_updates(state.params, updates), opt_state)
        ga = np.asarray(g["a"]) + wd * pa
        gc = float(g["b"]["c"][0, 0]) + wd * pc
        ba = ga if ba is None else m * ba + ga
        bc = gc if bc is None else m * bc + gc
        pa, pc = pa - lr * ba, pc - lr * bc
    np.testing.assert_allclose(state.params["a"], pa, rtol=1e-6)
    np.testing.assert_allclose(state.params["b"]["c"][0, 0], pc, rtol=1e-6)
    np.testing.assert_allclose(train.momentum(state)["a"], ba, rtol=1e-6)
    assert not hasattr(experts, "sgd_update")


def test_apply_fn_is_net_apply_with_the_same_gradients():
    shape = (6, 12, 12, 1)
    net = nets.ConvNet(width=4, depth=1, num_classes=C, first_padding=3)
    params = net.init(jax.random.PRNGKey(0), shape)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    y = jnp.arange(shape[0]) % C

    def loss(f):
        return lambda p, xx: -jnp.mean(jax.nn.log_softmax(f(p, xx))[jnp.arange(len(y)), y])

    fast = experts.apply_fn(net)
    np.testing.assert_allclose(fast(params, x), net.apply(params, x), rtol=1e-6, atol=1e-6)
    ga, gxa = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(params, x)
    gb, gxb = jax.jit(jax.grad(loss(net.apply), argnums=(0, 1)))(params, x)
    fa, fb = nets.flatten_params(ga), nets.flatten_params(gb)
    assert float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb)) < 1e-5
    np.testing.assert_allclose(gxa, gxb, rtol=1e-4, atol=1e-7)
    mlp = nets.MLP(width=8, num_classes=C)
    assert experts.apply_fn(mlp) == mlp.apply


def test_thin_conv_has_the_gradients_of_the_convolution():
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype(np.float32)
               for s in ((3, 8, 8, 3), (3, 3, 3, 5), (3, 8, 8, 5)))

    @jax.jit
    def both(x, w, g):
        out = []
        for conv in (nets._patch_grad_conv, nets._xla_conv):
            y, vjp = jax.vjp(lambda a, b, conv=conv: conv(a, b, 1), x, w)
            out.append((y, *vjp(g)))
        return out

    (ya, dxa, dwa), (yb, dxb, dwb) = both(x, w, g)
    np.testing.assert_allclose(ya, yb, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dxa, dxb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dwa, dwb, rtol=1e-5, atol=1e-5)


def test_reuse_host_memory_applies_before_jax_starts():
    code = ("from kipnb import experts; import jax.numpy as jnp; a = experts.reuse_host_memory(); "
            "jnp.ones(3).block_until_ready(); print(a, experts.reuse_host_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = "True False" if sys.platform.startswith("linux") else "False False"
    assert out.stdout.split() == expected.split()


# -------------------------------------------------------------------------- experts


def test_train_experts_writes_trajectories(toy, trained):
    out, traj = trained
    assert sorted(p.name for p in out.iterdir()) == ["expert_000.npz", "expert_001.npz"]
    P = nets.count_params(traj.template)
    assert traj.params.shape == (2, 4, P) and traj.params.dtype == np.float32
    assert (traj.num_experts, traj.epochs, traj.num_params) == (2, 3, P)
    assert traj.net == TINY.net(toy.image_shape, C) and traj.config == TINY
    # snapshot 0 is the initialization from (seed, expert)
    for i in range(2):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(TINY.seed), i), 0)
        init = nets.flatten_params(traj.net.init(key, toy.image_shape))
        np.testing.assert_array_equal(traj.params[i, 0], init)
    assert not np.array_equal(traj.params[0, 0], traj.params[1, 0])
    steps = np.linalg.norm(np.diff(traj.params, axis=1), axis=-1)
    assert np.all(steps > 1e-3), steps  # every epoch moved the parameters
    assert traj.test_accuracy.shape == (2, 3)
    assert np.all((traj.test_accuracy >= 0) & (traj.test_accuracy <= 1))
    assert traj.test_accuracy[:, -1].mean() > 0.4, traj.test_accuracy  # chance: 0.25
    loss = np.asarray(traj.meta["train_loss"])
    assert loss.shape == (2, 3) and np.all(loss[:, -1] < loss[:, 0])
    assert traj.meta["fingerprint"] == toy.fingerprint()
    assert traj.meta["image_shape"] == toy.image_shape and traj.meta["num_classes"] == C
    # load_trajectories reads the same
    again = experts.load_trajectories(out)
    np.testing.assert_array_equal(again.params, traj.params)
    np.testing.assert_array_equal(again.test_accuracy, traj.test_accuracy)
    early = experts.load_trajectories(out, max_epoch=1)
    assert early.epochs == 1 and early.test_accuracy.shape == (2, 1)
    np.testing.assert_array_equal(early.params, traj.params[:, :2])
    p = again.params_at(1, 2)
    np.testing.assert_array_equal(nets.flatten_params(p), traj.params[1, 2])
    assert traj.net.apply(p, toy.x_test[:3]).shape == (3, C)


def test_own_loop_over_init_and_update_equals_train_experts(toy, trained):
    """train_experts is kipnb.loop over experts.init / update: a hand-written loop over
    the public step functions gives the same snapshots, history and momentum, bit for bit."""
    out, traj = trained
    for i in range(TINY.num_experts):
        state = experts.init(TINY, toy, i)
        assert isinstance(state, experts.ExpertState) and state.epochs_done == 0
        for epoch in range(TINY.epochs):
            state, m = experts.update(TINY, toy, state, epoch)
            assert m["finite"] and m["lr"] == TINY.lr_at(epoch)
            assert m["test_accuracy"] == state.history["test_accuracy"][-1]
        assert state.epochs_done == TINY.epochs
        np.testing.assert_array_equal(np.stack(state.snapshots), traj.params[i])
        np.testing.assert_array_equal(state.history["test_accuracy"], traj.test_accuracy[i])
        assert state.history["train_loss"] == traj.meta["train_loss"][i]
        assert state.history["train_accuracy"] == traj.meta["train_accuracy"][i]
        meta = checkpoint.read_meta(experts.expert_path(out, i))
        saved, _ = checkpoint.load(experts.expert_path(out, i), {
            "momentum": np.zeros(traj.num_params, np.float32),
            "snapshots": np.zeros((TINY.epochs + 1, traj.num_params), np.float32)})
        np.testing.assert_array_equal(saved["momentum"], nets.flatten_params(state.momentum))
        assert meta["epochs_done"] == TINY.epochs and meta["complete"]
    with pytest.raises(ValueError, match=r"epoch=1: this state has done 0 epochs, so the "
                                         r"next epoch to train is 0"):
        experts.update(TINY, toy, experts.init(TINY, toy, 0), 1)
    with pytest.raises(ValueError, match=r"epoch=3: the config trains 3 epochs"):
        experts.update(TINY, toy, state, 3)
    with pytest.raises(ValueError, match="expert must be an integer >= 0"):
        experts.init(TINY, toy, -1)
    with pytest.raises(ValueError, match="config.dataset is 'fashion_mnist'"):
        experts.init(dataclasses.replace(TINY, dataset="fashion_mnist"), toy, 0)


def test_interrupted_run_resumes_to_identical_arrays(toy, trained, tmp_path):
    _, full = trained
    seen = []

    def stop_after_epoch_2(expert, epoch, info):
        seen.append((expert, epoch))
        assert info["path"].endswith(f"expert_{expert:03d}.npz")
        if (expert, epoch) == (0, 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        experts.train_experts(TINY, toy, tmp_path, progress=False, callback=stop_after_epoch_2)
    assert seen == [(0, 1), (0, 2)]
    assert [p.name for p in tmp_path.iterdir()] == ["expert_000.npz"]
    with pytest.raises(FileNotFoundError, match="complete_only=False"):
        experts.load_trajectories(tmp_path)
    part = experts.load_trajectories(tmp_path, complete_only=False)
    assert part.params.shape[:2] == (1, 3)
    np.testing.assert_array_equal(part.params[0], full.params[0, :3])

    seen.clear()
    resumed = experts.train_experts(TINY, toy, tmp_path, progress=False,
                                    callback=lambda e, k, info: seen.append((e, k)))
    assert seen == [(0, 3), (1, 1), (1, 2), (1, 3)]  # nothing was trained twice
    np.testing.assert_array_equal(resumed.params, full.params)
    np.testing.assert_array_equal(resumed.test_accuracy, full.test_accuracy)
    assert resumed.meta["train_loss"] == full.meta["train_loss"]
    # a finished run is not trained again; more experts are added to it
    seen.clear()
    more = experts.train_experts(dataclasses.replace(TINY, num_experts=3), toy, tmp_path,
                                 progress=False, callback=lambda e, k, info: seen.append((e, k)))
    assert seen == [(2, 1), (2, 2), (2, 3)]
    np.testing.assert_array_equal(more.params[:2], full.params)
    assert experts.load_trajectories(tmp_path).num_experts == 3


def test_another_config_in_the_directory_is_refused_and_files_are_kept(toy, trained):
    out, _ = trained
    before = _snapshot_files(out)
    for change, field in [({"lr": 0.02}, "lr: 0.05 there, 0.02 here"),
                          ({"width": 8}, "width: 4 there, 8 here"),
                          ({"augment": "none"}, "augment")]:
        with pytest.raises(CheckpointError, match=f"another run .*{field}.*left in place"):
            experts.train_experts(dataclasses.replace(TINY, **change), toy, out, progress=False)
    other = dataclasses.replace(toy, x_train=toy.x_train + 1.0)
    with pytest.raises(CheckpointError, match="other data"):
        experts.train_experts(TINY, other, out, progress=False)
    assert _snapshot_files(out) == before


def test_mixed_runs_and_missing_experts_are_reported(toy, trained, tmp_path):
    out, _ = trained
    with pytest.raises(FileNotFoundError, match="train_experts"):
        experts.load_trajectories(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist.*train_experts"):
        experts.load_trajectories(tmp_path / "nope")
    (tmp_path / "expert_000.npz").write_bytes((out / "expert_000.npz").read_bytes())
    cfg = dataclasses.replace(TINY, num_experts=1, epochs=1, lr=0.03)
    experts.train_experts(cfg, toy, tmp_path / "b", progress=False)
    os.replace(tmp_path / "b" / "expert_000.npz", tmp_path / "expert_001.npz")
    with pytest.raises(CheckpointError, match=r"mixes experts.*expert_001.npz.*epochs: 3 in "
                                              r"expert_000.npz, 1 in expert_001.npz.*lr"):
        experts.load_trajectories(tmp_path)


def test_truncated_expert_file_is_named_and_kept(toy, trained, tmp_path):
    out, _ = trained
    raw = (out / "expert_001.npz").read_bytes()
    for name in ("expert_000.npz", "expert_001.npz"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    bad = tmp_path / "expert_001.npz"
    bad.write_bytes(raw[: len(raw) // 2])
    for call in (lambda: experts.load_trajectories(tmp_path),
                 lambda: experts.train_experts(TINY, toy, tmp_path, progress=False)):
        with pytest.raises(CheckpointError, match=r"expert_001.npz could not be read.*left in"):
            call()
    assert bad.read_bytes() == raw[: len(raw) // 2]


def test_diverging_expert_names_expert_and_epoch(toy, tmp_path):
    cfg = dataclasses.replace(TINY, num_experts=1, epochs=3, lr=1e6, norm="none")
    with pytest.raises(experts.TrainingDivergedError,
                       match=r"Expert 0, epoch (\d)/3: the training loss became (nan|inf) at "
                             r"step \d \(lr=1e\+06\): training diverged. Lower ExpertConfig.lr"
                       ) as info:
        experts.train_experts(cfg, toy, tmp_path, progress=False)
    bad_epoch = int(info.value.args[0].split("epoch ")[1][0])
    if bad_epoch == 1:
        assert list(tmp_path.iterdir()) == []
    else:  # the file keeps the last good epoch, not the diverged one
        meta = checkpoint.read_meta(tmp_path / "expert_000.npz")
        assert meta["epochs_done"] == bad_epoch - 1
        assert "keeps the last good epoch" in str(info.value)


def test_data_of_another_dataset_is_refused(toy, tmp_path):
    with pytest.raises(ValueError, match="config.dataset is 'fashion_mnist'"):
        experts.train_experts(dataclasses.replace(TINY, dataset="fashion_mnist"), toy, tmp_path,
                              progress=False)


# ----------------------------------------------------------------------- evaluation

# The experts' network and batch shapes: evaluate reuses their compiled training step.
EVAL = experts.EvalConfig(epochs=40, batch_size=32, num_seeds=2)
EVAL_NET = TINY.net((12, 12, 1), C)


def test_evaluate_learns_an_easy_problem_with_hard_and_soft_labels(toy):
    x, y = toy.x_train, toy.y_train  # 16 images per class
    res = experts.evaluate(x, y, toy, EVAL_NET, lr=0.05, config=EVAL)
    assert len(res.accuracies) == 2 and len(res.train_accuracy) == 2
    assert res.mean == pytest.approx(np.mean(res.accuracies))
    assert res.std == pytest.approx(np.std(res.accuracies))
    assert res.mean > 0.9, res
    assert str(res) == f"{100 * res.mean:.1f} ± {100 * res.std:.1f} % (2 seeds)"
    assert res.seconds > 0
    soft = experts.evaluate(x, np.eye(C, dtype=np.float32)[y] * 10.0, toy, EVAL_NET, lr=0.05,
                            config=EVAL)
    assert soft.mean > 0.9 and abs(soft.mean - res.mean) < 0.08, (soft, res)
    # the same seeds give the same result
    again = experts.evaluate(x, y, toy, EVAL_NET, lr=0.05, config=EVAL)
    assert again.accuracies == res.accuracies


def test_evaluate_checks_its_inputs(toy):
    x, y = toy.x_train[:8], toy.y_train[:8]
    with pytest.raises(ValueError, match=r"images must be \(N, 12, 12, 1\)"):
        experts.evaluate(x[..., 0], y, toy, EVAL_NET, lr=0.01)
    with pytest.raises(ValueError, match=r"soft labels \(logits\) must have shape \(8, 4\)"):
        experts.evaluate(x, np.zeros((8, 3)), toy, EVAL_NET, lr=0.01)
    with pytest.raises(ValueError, match=r"classes in \[0, 4\)"):
        experts.evaluate(x, y + 4, toy, EVAL_NET, lr=0.01)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        experts.evaluate(x, y, toy, EVAL_NET, lr=float("nan"))
    with pytest.raises(ValueError, match="10 outputs but the data 4 classes"):
        experts.evaluate(x, y, toy, nets.ConvNet(width=8, depth=2, first_padding=3), lr=0.01)


def test_evaluate_reports_divergence(toy):
    cfg = experts.EvalConfig(epochs=3, batch_size=32, num_seeds=1)
    with pytest.raises(experts.TrainingDivergedError,
                       match=r"Evaluation network 0 .*(epoch \d/3: the training loss|the "
                             r"parameters) became .*lower lr"):
        experts.evaluate(toy.x_train, toy.y_train, toy, EVAL_NET, lr=1e20, config=cfg)


def test_experts_and_evaluation_match_the_pre_optax_reference(tmp_path):
    """train_experts (momentum, lr decay) and evaluate equal the values of the hand-written
    SGD step they used before the one optax trainer (tests/fixtures/trainer_reference.npz,
    written by make_trainer_reference.py at kipnb da3f15f): float32 rounding."""
    ref = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "trainer_reference.npz"))
    d = data.prepare("digits", n_train=200, n_test=100)
    cfg = experts.ExpertConfig(dataset="digits", width=8, depth=2, num_experts=1, epochs=3,
                               batch_size=64, lr=0.05, momentum=0.5, lr_decay=True)
    traj = experts.train_experts(cfg, d, tmp_path / "experts", progress=False)
    np.testing.assert_allclose(traj.params[0], ref["expert_snapshots"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(traj.test_accuracy[0], ref["expert_test_accuracy"], atol=1e-6)
    r = experts.evaluate(d.x_train[:20], d.y_train[:20], d, traj.net, lr=0.02,
                         config=experts.EvalConfig(epochs=6, batch_size=16, num_seeds=2))
    np.testing.assert_allclose(r.accuracies, ref["eval_hard_acc"], atol=1e-6)
    np.testing.assert_allclose(r.train_accuracy, ref["eval_hard_train_acc"], atol=1e-6)
