"""Any method's set, judged by any evaluator: LS, KIP, importance-initialised KIP, MTT and
DATM sets on digits are saved, loaded from disk and judged by evaluate.krr and
evaluate.network (both protocols); the pixel/model round trip, format-1 files and a
preprocessing mismatch. Tiny runs: the point is the contract, not the accuracy."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from kipnb import DistilledSet, data, evaluate, experts, kip, label_solve, nets, sampling, tm

CHANCE = 0.1
KIP_CFG = kip.KIPConfig(dataset="digits", arch="fc", depth=2, ipc=2, steps=30,
                        target_batch_size=500, eval_every=0, checkpoint_every=0)
EXPERTS = experts.ExpertConfig(dataset="digits", width=8, depth=2, num_experts=2, epochs=3,
                               batch_size=128, lr=0.2, augment="none")
TM_BASE = dict(ipc=2, iterations=6, syn_steps=4, expert_epochs=1, max_start_epoch=2,
               lr_img=10.0, eval_at_end=False, loop="python", checkpoint_every=0,
               augment="crop_flip")
MTT_NET = nets.ConvNet(width=8, depth=2, num_classes=10, first_padding=3)
MTT_SETTINGS = dict(epochs=300, num_seeds=1, batch_size=64, augment="crop_flip")
TRANSFER = dict(net="fc", width=256, depth=1, steps=200, seeds=(0,))


@pytest.fixture(scope="module")
def kd():
    return kip.prepare("digits")


@pytest.fixture(scope="module")
def td():
    return experts.prepare("digits", preprocessing="standardize")


@pytest.fixture(scope="module")
def saved(kd, td, tmp_path_factory):
    """One set per method, each saved to disk and loaded back."""
    out = tmp_path_factory.mktemp("sets")
    sets = {"ls": label_solve.solve(kd, 2, depth=2, n_targets=600)}
    sets["kip"] = kip.run(KIP_CFG, kd, progress=False).distilled
    scores = sampling.krr_sensitivity(kd.x_train, kd.labels_train, 10, landmarks_per_class=10)
    idx = sampling.sample_init(0, scores, kd.labels_train, KIP_CFG.ipc, 10)
    sets["kip_importance"] = kip.run(KIP_CFG, kd, progress=False,
                                     initial=sampling.initial_support(kd, idx)).distilled
    traj = experts.train_experts(EXPERTS, td, out / "experts", progress=False)
    ev = experts.EvalConfig(epochs=2, num_seeds=1)
    sets["mtt"] = tm.run(tm.TMConfig(method="mtt", evaluation=ev, **TM_BASE), td, traj,
                         progress=False).distilled
    sets["datm"] = tm.run(tm.TMConfig(method="datm", evaluation=ev, current_max_start_epoch=1,
                                      expansion_end=3, **TM_BASE), td, traj,
                          progress=False).distilled
    loaded = {}
    for name, ds in sets.items():
        path = ds.save(out / f"{name}.npz")
        loaded[name] = DistilledSet.load(path)
    return sets, loaded


KINDS = {"ls": "regression", "kip": "regression", "kip_importance": "regression",
         "mtt": "class", "datm": "logits"}


def test_every_method_writes_format_2(saved, kd):
    sets, loaded = saved
    for name, ds in loaded.items():
        assert ds.label_kind == KINDS[name], name
        assert ds.num_classes == 10 and len(ds) == 20
        np.testing.assert_array_equal(ds.classes, np.sort(ds.classes))  # class order
        assert np.bincount(ds.classes, minlength=10).tolist() == [2] * 10
        assert ds.source["dataset"] == "digits" and ds.source["ipc"] == 2
        assert ds.source["data_fingerprint"] == kd.fingerprint()  # same training data
        assert ds.source["kipnb_version"] and ds.source["method"] and ds.source["learner"]
        assert (ds.lr is not None) == (name in ("mtt", "datm"))
        np.testing.assert_array_equal(ds.images, sets[name].images)
        np.testing.assert_array_equal(ds.labels, sets[name].labels)
    assert loaded["kip_importance"].source["init"] == "given"


@pytest.mark.parametrize("name", sorted(KINDS))
def test_any_set_by_any_evaluator(saved, kd, td, name):
    ds = saved[1][name]
    r_krr = evaluate.krr(ds, kd, kernel="fc", depth=2)
    r_krr_td = evaluate.krr(ds, td, kernel="fc", depth=2)  # the other data type: same space
    assert r_krr.protocol["images"] == r_krr_td.protocol["images"] == "as stored"
    assert r_krr.mean == pytest.approx(r_krr_td.mean)
    r_net = evaluate.network(ds, kd, **TRANSFER)
    r_mtt = evaluate.network(ds, td, protocol="mtt", net=MTT_NET, **MTT_SETTINGS)
    for r in (r_krr, r_net, r_mtt):
        assert r.mean > 4 * CHANCE, (name, str(r), r.protocol)
        json.dumps(r.protocol)
    assert r_mtt.protocol["lr_from"] == ("the set" if ds.lr is not None else "default")
    expected = {"regression": ("as given", "argmax(labels)"), "class": ("one-hot - 1/C", "classes"),
                "logits": ("softmax(logits) - 1/C", "softmax(logits)")}[ds.label_kind]
    assert (r_net.protocol["labels"], r_mtt.protocol["labels"]) == expected


def test_label_conversions_follow_the_papers(saved):
    kip_set, datm = saved[1]["kip"], saved[1]["datm"]
    y, _ = evaluate.labels_for(kip_set, "mse")
    np.testing.assert_array_equal(y, kip_set.labels)  # KIP transfer: MSE on learned labels
    y, _ = evaluate.labels_for(kip_set, "xent")
    np.testing.assert_array_equal(y, kip_set.labels.argmax(1))
    y, _ = evaluate.labels_for(datm, "mse")
    p = np.asarray(jax.nn.softmax(datm.labels, axis=1))
    np.testing.assert_allclose(y, p - 0.1, atol=1e-6)
    y, _ = evaluate.labels_for(datm, "xent")  # experts.evaluate: softmax(logits) targets
    np.testing.assert_array_equal(y, datm.labels)


def test_pixel_model_round_trip(saved, kd):
    ds = saved[1]["kip"]
    np.testing.assert_allclose(ds.transform.apply(ds.to_pixels()), ds.images, atol=1e-5)
    np.testing.assert_array_equal(ds.transform.apply(kd.x_train[:0].reshape(0, 8, 8, 1)),
                                  kd.transform.apply(kd.x_train[:0].reshape(0, 8, 8, 1)))
    assert evaluate.krr(ds, kd, depth=2).mean == evaluate.krr(saved[0]["kip"], kd, depth=2).mean


def test_format1_file_is_judged_in_pixel_space(saved, kd, tmp_path):
    ds = saved[1]["kip"]
    meta = {"format_version": 1, "method": "kip", "dataset": "digits", "ipc": 2,
            "preprocessing": ds.preprocessing, "config": {}, "extra": {},
            "arrays": ["model_images"]}
    np.savez(tmp_path / "old.npz", images=ds.to_pixels(), labels=ds.labels,
             meta=np.asarray(json.dumps(meta)), model_images=ds.images)
    old = DistilledSet.load(tmp_path / "old.npz")
    assert old.transform is None and old.label_kind == "regression"
    r_old, r_new = evaluate.krr(old, kd, depth=2), evaluate.krr(ds, kd, depth=2)
    assert r_old.protocol["images"] == "converted"
    assert abs(r_old.mean - r_new.mean) < 0.01


def test_preprocessing_mismatch_is_converted_or_refused(saved, kd):
    ds = saved[1]["kip"]  # standardized digits
    zca = kip.prepare(kip.KIPConfig(dataset="digits", preprocessing="zca"))
    r = evaluate.krr(ds, zca, depth=2)
    assert r.protocol["images"] == "converted" and r.mean > 4 * CHANCE
    x, how = evaluate.inputs(ds, zca)
    np.testing.assert_allclose(x, zca.transform.apply(kd.transform.invert(ds.images)), atol=1e-5)
    with pytest.raises(ValueError, match=r"'standardize'.*preprocessing is .*'zca'"):
        evaluate.krr(ds, zca, on_mismatch="error")
    # the two ZCAs are different spaces, named apart in the error
    kornia = data.prepare("digits", "zca_kornia")
    zca_set = DistilledSet(zca.x_train[:10], zca.y_train[:10], "class", 10,
                           transform=zca.transform)
    with pytest.raises(ValueError, match=r"space of 'zca' .*'relative': True.*preprocessing "
                                         r"is 'zca_kornia' .*'relative': False"):
        evaluate.network(zca_set, kornia, protocol="mtt", on_mismatch="error")
    x, how = evaluate.inputs(zca_set, kornia)
    assert how == "converted"
    np.testing.assert_allclose(x, kornia.x_train[:10], atol=2e-3)
    fashion_like = DistilledSet(np.zeros((2, 28, 28, 1)), np.array([0, 1]), "class", 10)
    with pytest.raises(ValueError, match=r"images are \(28, 28, 1\) but the data's are \(8, 8, 1\)"):
        evaluate.krr(fashion_like, kd)
