"""kipnb.sampling: sensitivities, importance-sampled initialization and batches, exact resume."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from kipnb import checkpoint, kip, krr, sampling

TINY = kip.KIPConfig(dataset="digits", arch="fc", depth=2, ipc=2, steps=6, learning_rate=0.01,
                     target_batch_size=200, eval_every=3, eval_test_size=200, checkpoint_every=2)


@pytest.fixture(scope="module")
def digits():
    return kip.prepare("digits")


def _toy_loss(losses):
    """A loss_fn reading the point's index from its only pixel: losses[index]."""
    calls = []

    def loss_fn(support, xb, yb):
        calls.append(len(xb))
        return losses[np.asarray(xb)[:, 0].astype(int)]

    return loss_fn, calls


def _toy_sampler(losses, labels, **kw):
    x = np.arange(len(losses), dtype=np.float32)[:, None]
    fn, calls = _toy_loss(losses)
    kw.setdefault("batch_size", 20)
    return sampling.ImportanceSampler(x, labels, int(labels.max()) + 1, loss_fn=fn, **kw), calls


# ------------------------------------------------------------------ sensitivities


def test_krr_sensitivity_is_high_for_mislabelled_and_outlying_points(digits):
    x, labels = digits.x_train.copy(), digits.labels_train.copy()
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(x), 20, replace=False)
    labels[flipped] = (labels[flipped] + 3) % 10
    rest = np.setdiff1d(np.arange(len(x)), flipped)
    odd = rng.choice(rest, 5, replace=False)
    x[odd] = 4 * rng.standard_normal(x[odd].shape).astype(np.float32)  # not digits at all
    p = sampling.krr_sensitivity(x, labels, 10, landmarks_per_class=20, return_parts=True)
    s = p["sensitivity"]
    normal = np.setdiff1d(rest, odd)
    np.testing.assert_allclose(s, p["leverage"] + p["residual"], rtol=1e-12)
    # mislabelled: badly fit (residual), and so more sensitive
    assert np.median(p["residual"][flipped]) > 10 * np.median(p["residual"][normal])
    rank = np.argsort(np.argsort(s)) / len(s)
    assert rank[flipped].min() > 0.9 and np.mean(s[flipped]) > 1.8 * np.mean(s[normal])
    assert np.mean(p["loss"][flipped]) > 5 * np.mean(p["loss"][normal])
    # outlying images: high leverage, in the top 2 %
    assert rank[odd].min() > 0.98 and p["leverage"][odd].min() > p["leverage"][normal].max()
    # totals as documented: leverages <= m, residual terms about C - 1 (rank of R)
    m = p["landmarks"].shape[1]
    assert p["landmarks"].shape == (2, 200) and 0 < p["leverage"].sum() <= m + 1e-3
    assert 0 < p["residual"].sum() <= 10 and (s > 0).all()  # ~C - 1 (two fits mixed)
    # cross-fitting: landmarks are not favoured
    for lm in p["landmarks"]:
        other = np.setdiff1d(normal, lm)
        assert np.mean(s[np.intersect1d(lm, normal)]) < 1.5 * np.mean(s[other])
    # deterministic
    np.testing.assert_array_equal(
        s, sampling.krr_sensitivity(x, labels, 10, landmarks_per_class=20))


def test_kmeans_sensitivity_sums_and_outliers(digits):
    x, labels = digits.x_train.copy(), digits.labels_train
    far = np.flatnonzero(labels == 4)[0]
    x[far] += 50.0
    p = sampling.kmeans_sensitivity(x, labels, 10, k=5, return_parts=True)
    s = p["sensitivity"]
    for c in range(10):
        in_c = labels == c
        assert s[in_c].sum() == pytest.approx(1 + len(np.unique(p["cluster"][in_c])), rel=1e-9)
        assert len(np.unique(p["cluster"][in_c])) <= 5
    assert s[far] == s[labels == 4].max() and s[far] > 0.5  # it alone holds most of the cost
    np.testing.assert_allclose(s, p["distance2"] / np.array(
        [p["distance2"][labels == c].sum() for c in labels]) + 1 / p["cluster_size"])
    np.testing.assert_array_equal(s, sampling.kmeans_sensitivity(x, labels, 10, k=5))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        sampling.kmeans_sensitivity(x, labels, 10, k=0)


def test_sensitivity_input_errors(digits):
    with pytest.raises(ValueError, match="labels has 10 entries but x has 1348 rows"):
        sampling.krr_sensitivity(digits.x_train, digits.labels_train[:10], 10)
    with pytest.raises(ValueError, match="'ntk' or 'nngp'"):
        sampling.krr_sensitivity(digits.x_train, digits.labels_train, 10, get="both")


# ------------------------------------------------------------------ initialization


def test_sample_init_is_class_balanced_without_replacement_and_deterministic(digits):
    s = sampling.kmeans_sensitivity(digits.x_train, digits.labels_train, 10)
    idx = sampling.sample_init(0, s, digits.labels_train, 5, 10)
    assert idx.shape == (50,) and len(np.unique(idx)) == 50
    np.testing.assert_array_equal(digits.labels_train[idx], np.repeat(np.arange(10), 5))
    np.testing.assert_array_equal(idx, sampling.sample_init(0, s, digits.labels_train, 5, 10))
    assert not np.array_equal(idx, sampling.sample_init(1, s, digits.labels_train, 5, 10))
    key = jax.random.key(3)
    np.testing.assert_array_equal(sampling.sample_init(key, s, digits.labels_train, 5, 10),
                                  sampling.sample_init(key, s, digits.labels_train, 5, 10))
    # points with score 0 are never picked; a class's whole positive set can be taken
    z = s.copy()
    z[digits.labels_train == 2] = 0
    keep = np.flatnonzero(digits.labels_train == 2)[:3]
    z[keep] = 1
    picked = sampling.sample_init(5, z, digits.labels_train, 3, 10)
    np.testing.assert_array_equal(picked[6:9], keep)


def test_sample_init_respects_min_dist(digits):
    s = np.ones(len(digits.labels_train))
    x = digits.x_train
    auto = sampling.auto_min_dist(x, digits.labels_train, 10)
    assert auto.shape == (10,) and (auto > 0).all()
    flat = x.reshape(len(x), -1)
    for md in (auto, 4.0):
        idx = sampling.sample_init(0, s, digits.labels_train, 10, 10, min_dist=md, x=x)
        thr = np.broadcast_to(md, (10,))
        for c in range(10):
            pts = flat[idx[digits.labels_train[idx] == c]]
            dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
            assert dist[np.triu_indices(10, 1)].min() >= thr[c]
    # 'auto' gives the same thresholds
    np.testing.assert_array_equal(
        sampling.sample_init(0, s, digits.labels_train, 10, 10, min_dist="auto", x=x),
        sampling.sample_init(0, s, digits.labels_train, 10, 10, min_dist=auto, x=x))
    # without the filter, near-duplicates are picked: a tight cluster of copies wins
    x2, s2 = x.copy(), np.full(len(x), 1e-6)
    c0 = np.flatnonzero(digits.labels_train == 0)
    x2[c0[:5]] = x2[c0[0]] + 1e-3 * np.arange(5)[:, None, None, None]
    s2[c0[:5]] = 1.0
    plain = sampling.sample_init(0, s2, digits.labels_train, 3, 10)
    assert set(plain[:3]) <= set(c0[:5])
    filt = sampling.sample_init(0, s2, digits.labels_train, 3, 10, min_dist="auto", x=x2)
    assert len(set(filt[:3]) & set(c0[:5])) == 1


def test_high_scores_are_picked_more_often(digits):
    labels = digits.labels_train
    rng = np.random.default_rng(0)
    high = rng.random(len(labels)) < 0.5
    s = np.where(high, 10.0, 1.0)
    hits = [high[sampling.sample_init(seed, s, labels, 1, 10)] for seed in range(300)]
    frac = np.mean(hits)
    n_h = np.array([high[labels == c].sum() for c in range(10)])
    n_l = np.bincount(labels, minlength=10) - n_h
    expected = np.mean(10 * n_h / (10 * n_h + n_l))  # P(first pick is high), per class
    assert abs(frac - expected) < 0.03, (frac, expected)  # ~0.91; uniform would be ~0.5


@pytest.mark.parametrize("kw,match", [
    (dict(ipc=200), r"Cannot pick 200 points of class 0: it has only \d+ .*ipc <= \d+"),
    (dict(scores="nan"), r"finite and >= 0: 1 NaN/Inf and 0 negative entries \(first at index 7"),
    (dict(scores="neg"), r"0 NaN/Inf and 1 negative"),
    (dict(scores="short"), "labels has 1348 entries but scores has 10 rows"),
    (dict(min_dist=1.0, x=None), "min_dist needs the images"),
    (dict(min_dist=1e3), r"at least min_dist=1000 apart: found only 1.*Lower min_dist"),
    (dict(min_dist="far"), "'auto' or None"),
    (dict(ipc=0), "ipc must be a positive integer"),
])
def test_sample_init_errors(digits, kw, match):
    s = np.ones(len(digits.labels_train))
    scores = {"nan": np.where(np.arange(len(s)) == 7, np.nan, s),
              "neg": np.where(np.arange(len(s)) == 9, -1.0, s), "short": s[:10]}
    args = {"ipc": 2, "min_dist": None, "x": digits.x_train, **kw}
    sc = scores.get(kw.get("scores"), s) if isinstance(kw.get("scores"), str) else s
    with pytest.raises(ValueError, match=match):
        sampling.sample_init(0, sc, digits.labels_train, args["ipc"], 10,
                             min_dist=args["min_dist"], x=args["x"])


def test_initial_support_and_uniform_init_match_kip(digits):
    idx = sampling.uniform_init(TINY.seed, digits.labels_train, TINY.ipc, 10)
    mine = sampling.initial_support(digits, idx)
    ref = kip.init_support(TINY, digits)
    for k in ("images", "labels"):
        np.testing.assert_array_equal(mine[k], ref[k])


# ------------------------------------------------------------------- batch sampler


def test_probabilities_are_mixed_with_uniform():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), [10, 30, 60])
    losses = rng.random(100) ** 4
    losses[5] = 0.0
    sm, _ = _toy_sampler(losses, labels, stratify=False, mix=0.3)
    sm.sample(0, {})
    np.testing.assert_allclose(sm.probs, 0.7 * losses / losses.sum() + 0.3 / 100)
    assert sm.probs.min() >= 0.3 / 100 and sm.probs.sum() == pytest.approx(1)
    st, _ = _toy_sampler(losses, labels, stratify=True, mix=0.3)
    st.sample(0, {})
    for c, n_c in enumerate((10, 30, 60)):
        p = st.probs[labels == c]
        assert p.sum() == pytest.approx(1 / 3) and p.min() >= 0.3 / (3 * n_c) - 1e-15
    assert sm.refreshed_at == 0 and np.array_equal(sm.last_losses, losses)


@pytest.mark.parametrize("stratify", [False, True])
def test_weights_make_the_batch_loss_unbiased(stratify):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), [10, 30, 60])  # unequal classes
    losses = rng.random(100) ** 3
    sm, _ = _toy_sampler(losses, labels, stratify=stratify, mix=0.2, batch_size=30,
                         refresh_every=10**6)
    target = losses.mean()
    # exact expectation of the weighted batch mean, from the probabilities
    sm.sample(0, {})
    if stratify:
        per_class = [np.sum(sm.probs[labels == c] * 3 * (1 / (100 * sm.probs[labels == c]))
                            * losses[labels == c]) for c in range(3)]
        exact = np.sum(per_class) / 3
    else:
        exact = np.sum(sm.probs / (100 * sm.probs) * losses)
    assert exact == pytest.approx(target, rel=1e-12)
    # and by Monte Carlo over many steps
    est = []
    for step in range(3000):
        idx, w = sm.sample(step, {})
        assert len(idx) == 30
        est.append(np.mean(w * losses[idx]))
    est = np.asarray(est)
    assert abs(est.mean() - target) < 4 * est.std() / np.sqrt(len(est)), (est.mean(), target)
    # the importance draw has lower variance than uniform draws for this loss estimate
    uni = [losses[rng.choice(100, 30)].mean() for _ in range(3000)]
    assert est.std() < np.std(uni)


def test_sampler_is_deterministic_refreshes_on_schedule_and_restores():
    labels = np.repeat(np.arange(4), 25)
    losses = np.linspace(0.1, 2.0, 100)
    a, calls = _toy_sampler(losses, labels, refresh_every=3, block_size=40)
    b, _ = _toy_sampler(losses, labels, refresh_every=3, block_size=40)
    for step in range(7):
        ia, wa = a.sample(step, {})
        ib, wb = b.sample(step, {})
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(wa, wb)
    assert calls == [40, 40, 40] * 3  # refreshes at steps 0, 3, 6; padded blocks of 40
    assert not np.array_equal(a.sample(7, {})[0], a.sample(8, {})[0])
    # restore: a fresh sampler continues exactly, without recomputing before it is due
    fresh, fresh_calls = _toy_sampler(losses * 0 + 1, labels, refresh_every=3, block_size=40)
    fresh.restore(a.state())
    np.testing.assert_array_equal(fresh.sample(8, {})[1], a.sample(8, {})[1])
    assert fresh_calls == [] and fresh.refreshed_at == 6
    st = a.state()
    assert st["probs"].dtype == np.float64 and st["step"].dtype == np.int64
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        fresh.restore({"probs": np.ones(3) / 3, "step": np.int64(0)})
    # weighted=False gives no weights
    c, _ = _toy_sampler(losses, labels, weighted=False)
    assert c.sample(0, {})[1] is None


def test_pool_losses_and_loss_fn_errors():
    labels = np.repeat(np.arange(2), 50)
    losses = np.arange(100, dtype=float) + 1
    sm, calls = _toy_sampler(losses, labels, pool_size=20)
    full = sm.point_losses(4, {})
    assert sum(calls) == 20
    pool = np.flatnonzero(full == losses)
    assert len(pool) == 20
    for c in (0, 1):
        out = np.setdiff1d(np.flatnonzero(labels == c), pool)
        in_c = np.intersect1d(np.flatnonzero(labels == c), pool)
        np.testing.assert_allclose(full[out], losses[in_c].mean())
    bad, _ = _toy_sampler(-losses, labels)
    with pytest.raises(ValueError, match="100 negative losses at step 0"):
        bad.sample(0, {})
    x = np.zeros((100, 1), np.float32)
    wrong = sampling.ImportanceSampler(x, labels, 2, 10, loss_fn=lambda s, xb, yb: np.ones(3))
    with pytest.raises(ValueError, match=r"one loss per row, shape \(100,\), got \(3,\)"):
        wrong.sample(0, {})
    with pytest.raises(ValueError, match=r"mix must be in \(0, 1\]"):
        sampling.ImportanceSampler(x, labels, 2, 10, loss_fn=lambda *a: 0, mix=0.0)
    with pytest.raises(ValueError, match="batch_size 1 < C = 2"):
        sampling.ImportanceSampler(x, labels, 2, 1, loss_fn=lambda *a: 0)


def test_krr_loss_is_kips_per_point_loss(digits):
    kernel_fn = kip.kernel_for(TINY, 10)
    support = kip.init_support(TINY, digits)
    xt, yt = digits.x_train[:300], krr.one_hot_targets(digits.labels_train[:300], 10)
    per = sampling.KRRLoss(kernel_fn, "ntk", TINY.reg)(support, xt, yt)
    loss, _ = kip.kip_loss(kernel_fn, "ntk", TINY.reg, support["images"], support["labels"],
                           xt, yt)
    assert per.shape == (300,) and per.mean() == pytest.approx(float(loss), rel=1e-5)
    ce = sampling.KRRLoss(kernel_fn, kind="ce")(support, xt, yt)
    assert (ce > 0).all() and np.corrcoef(ce, per)[0, 1] > 0.3
    with pytest.raises(ValueError, match="'mse' or 'ce'"):
        sampling.KRRLoss(kernel_fn, kind="hinge")


# ------------------------------------------------------------------ KIP, exact resume


class _Stop(Exception):
    pass


def test_kip_with_importance_init_and_batches_resumes_exactly(digits, tmp_path):
    cfg = dataclasses.replace(TINY, steps=8)
    scores = sampling.krr_sensitivity(digits.x_train, digits.labels_train, 10,
                                      kernel_fn=kip.kernel_for(cfg, 10), landmarks_per_class=20)
    idx = sampling.sample_init(cfg.seed, scores, digits.labels_train, cfg.ipc, 10,
                               min_dist="auto", x=digits.x_train)
    initial = sampling.initial_support(digits, idx)
    assert not np.array_equal(idx, sampling.uniform_init(cfg.seed, digits.labels_train, 2, 10))

    def sampler():
        return sampling.ImportanceSampler.for_kip(cfg, digits, refresh_every=3)

    s0 = sampler()
    straight = kip.run(cfg, digits, initial=initial, batch_sampler=s0, progress=False)
    assert s0.refreshed_at == 6 and s0.probs.std() > 0  # refreshed at 0, 3, 6
    h = straight.history
    assert np.isfinite(h["loss"]).all() and h["test_acc"][-1] > 0.5  # chance is 0.1

    def stop_after_5(info):
        if info["step"] == 5:
            raise _Stop

    with pytest.raises(_Stop):
        kip.run(cfg, digits, initial=initial, batch_sampler=sampler(),
                checkpoint_dir=tmp_path, callback=stop_after_5, progress=False)
    meta = checkpoint.read_meta(tmp_path / kip.CHECKPOINT_NAME)
    assert meta["step"] == 4  # checkpoints every 2 steps; step 5 was lost
    s1 = sampler()
    resumed = kip.run(cfg, digits, initial=initial, batch_sampler=s1, checkpoint_dir=tmp_path,
                      progress=False)
    for k in ("images", "labels"):
        np.testing.assert_array_equal(resumed.support[k], straight.support[k])
    assert resumed.history["loss"] == h["loss"]
    np.testing.assert_array_equal(s1.probs, s0.probs)
