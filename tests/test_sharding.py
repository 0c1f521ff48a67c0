"""Sharding over several devices (kipnb.shard): same numbers as one device.

The multi-device half runs in a subprocess with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), since the device count is
fixed when JAX starts; the one-device half runs here.

Both halves compute in float64. On 8 devices the sums run in another order, so float32
results differ from one device's by rounding that depends on the data and the
conditioning of each solve (a KIP loss once differed by 1.0006e-5 relative, against a
float32 tolerance of 1e-5): a tolerance near float32's error flakes, one far above it
would not catch a wrong partition. In float64 the rounding is ~1e-13, so a tolerance of
1e-9 is both safe and sharp: a real sharding bug (a dropped or doubled block) is an
O(1) difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from kipnb import shard

HERE = Path(__file__).resolve().parent
N_DEV = 8


def compute() -> dict:
    """Kernels, KRR evaluation, Label Solve and a short KIP run, as JSON-able lists."""
    import dataclasses

    from kipnb import archs, kip, krr

    d = kip.prepare("digits")
    m = shard.mesh()
    out: dict = {"device_count": jax.device_count(), "mesh_size": shard.device_count(m)}

    x = shard.shard_batch(np.zeros((16, 3), np.float32), m)
    out["sharded_devices"] = len(x.sharding.device_set)
    out["addressable_shards"] = len(x.addressable_shards)
    out["shard_rows"] = [int(s.data.shape[0]) for s in x.addressable_shards]

    f64 = np.float64
    x1, x2 = d.x_train[:48].astype(f64), d.x_test[:16].astype(f64)
    for name, kfn in (("fc", archs.fc(depth=2)[2]),
                      ("conv", archs.convnet(depth=1, width=8)[2])):
        k = jax.jit(kfn, static_argnums=2)(shard.shard_batch(x1, m), shard.replicate(x2, m),
                                           "ntk")
        out[f"kernel_{name}"] = np.asarray(k).tolist()
        out[f"kernel_{name}_devices"] = len(k.sharding.device_set)

    kfn = kip.kernel_for(kip.KIPConfig(dataset="digits", arch="fc", depth=2), d.num_classes)
    x_s, labels_s = d.x_train[:40].astype(f64), d.labels_train[:40]
    y_s = krr.one_hot_targets(labels_s, d.num_classes, dtype=f64)
    ev = krr.krr_evaluate(kfn, x_s, y_s, d.x_test[:300].astype(f64), d.labels_test[:300],
                          block_size=100)
    out["eval"] = [ev["accuracy"], ev["mse"]]
    # Targets disjoint from the support: at x1 == x2 the arc-cosine kernels turn float32
    # rounding differences (a different summation order on 8 devices) of ~1e-7 in the
    # cosine into ~1e-4 in the kernel, and Label Solve amplifies them further.
    y_t = np.asarray(krr.one_hot_targets(d.labels_train[40:540], d.num_classes, dtype=f64))
    ls = krr.label_solve(kfn, x_s, d.x_train[40:540].astype(f64), y_t, block_size=128)
    out["label_solve"] = np.asarray(ls).tolist()

    cfg = kip.KIPConfig(dataset="digits", arch="fc", depth=2, ipc=2, steps=3,
                        target_batch_size=200, eval_every=0, float64=True)
    res = kip.run(cfg, d, progress=False)
    out["kip_loss"] = res.history["loss"]
    out["kip_images"] = np.asarray(res.support["images"]).ravel().tolist()
    # A batch that is not a multiple of the device count falls back to replicated targets.
    res = kip.run(dataclasses.replace(cfg, steps=1, target_batch_size=1797 - 3,
                                      target_sampling="uniform"), d, progress=False)
    out["kip_loss_odd"] = res.history["loss"]

    from kipnb import train

    tcfg = train.TrainConfig(arch="fc", depth=1, width=64, steps=20, seeds=(0,))
    r = train.train_network(tcfg, x_s, y_s, d.x_test[:200].astype(f64), d.labels_test[:200])
    out["train_outputs"] = np.asarray(r["train_outputs"]).tolist()
    out["train_test_acc"] = r["test_acc"]
    # kipnb.train computes in float32 always. Its float32 error scale: the same training
    # with the support rows reversed (the same math, sums in another order).
    rev = slice(None, None, -1)
    r = train.train_network(tcfg, x_s[rev], y_s[rev], d.x_test[:200].astype(f64),
                            d.labels_test[:200])
    out["train_outputs_reordered"] = np.asarray(r["train_outputs"])[rev].tolist()
    out["dtypes"] = sorted({str(np.asarray(v).dtype) for v in (k, ev["mse"], ls)}
                           | {str(res.support["images"].dtype)})
    return out


def on_8_devices(expr: str, **env_extra) -> str:
    """The printed value of ``expr`` (over this module as ``t``) in an 8-device process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={N_DEV}", **env_extra)
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import test_sharding as t; "
            f"print('OUT' + {expr})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [ln for ln in proc.stdout.splitlines() if ln.startswith("OUT")][-1][3:]


@pytest.fixture(scope="module")
def multi() -> dict:
    return json.loads(on_8_devices("json.dumps(t.compute())", JAX_ENABLE_X64="1"))


@pytest.fixture(scope="module")
def single() -> dict:
    if jax.device_count() != 1:
        pytest.skip("the reference needs a process with one device")
    with jax.enable_x64(True):
        return compute()


def _close(a, b, rtol=1e-9):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b) + 1e-12, (
        np.abs(a - b).max(), np.abs(b).max())


def test_computed_in_float64(multi, single):
    assert multi["dtypes"] == single["dtypes"] == ["float64"]


def test_really_sharded(multi, single):
    assert multi["device_count"] == multi["mesh_size"] == N_DEV
    assert multi["sharded_devices"] == multi["addressable_shards"] == N_DEV
    assert multi["shard_rows"] == [16 // N_DEV] * N_DEV
    assert multi["kernel_fc_devices"] == multi["kernel_conv_devices"] == N_DEV
    assert single["mesh_size"] == single["sharded_devices"] == 1


def test_kernels_equal(multi, single):
    for name in ("kernel_fc", "kernel_conv"):
        _close(multi[name], single[name])


def test_krr_evaluate_and_label_solve_equal(multi, single):
    assert multi["eval"][0] == single["eval"][0]
    _close(multi["eval"][1], single["eval"][1])
    _close(multi["label_solve"], single["label_solve"])


def test_kip_equal(multi, single):
    _close(multi["kip_loss"], single["kip_loss"])
    _close(multi["kip_images"], single["kip_images"])
    _close(multi["kip_loss_odd"], single["kip_loss_odd"])


def test_finite_network_training_equal(multi, single):
    """float32 training: the tolerance is set from this computation's own rounding."""
    b = np.asarray(single["train_outputs"])
    rounding = np.linalg.norm(np.asarray(single["train_outputs_reordered"]) - b)
    rtol = max(20 * rounding, 1e-6 * np.linalg.norm(b)) / np.linalg.norm(b)
    assert rtol < 1e-3, f"float32 rounding alone moves the outputs by {rtol:.1e}"
    _close(multi["train_outputs"], b, rtol=rtol)
    assert abs(multi["train_test_acc"] - single["train_test_acc"]) <= 0.01


def test_shard_helpers():
    m = shard.mesh()
    assert shard.mesh() is m and shard.mesh(jax.devices()) is m
    assert m.axis_names == ("data",)
    assert shard.pad_to_multiple(5, 4) == 8 and shard.pad_to_multiple(8, 4) == 8
    assert shard.pad_to_multiple(7, m) % shard.device_count(m) == 0
    x = np.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(np.asarray(shard.shard_batch(x, m)), x)
    np.testing.assert_array_equal(np.asarray(shard.replicate(x, m)), x)
    with pytest.raises(ValueError, match="leading"):
        shard.shard_batch(np.float32(1.0), m)


def _needs_multiple_error() -> str:
    """In a process with several devices: shard_batch's error for a non-multiple size."""
    m = shard.mesh()
    try:
        shard.shard_batch(np.zeros(shard.device_count(m) + 1), m)
    except ValueError as e:
        return str(e)
    return "no error"


def test_shard_batch_needs_multiple():
    # Runs in the 8-device subprocess: with one device every size is a multiple.
    msg = on_8_devices("t._needs_multiple_error()")
    assert "pad_to_multiple" in msg, msg


def test_maybe_initialize_distributed_single_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                "MEGASCALE_NUM_SLICES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "KIPNB_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)
    assert shard.multi_process_env() is None
    assert shard.maybe_initialize_distributed() is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM
    assert shard.multi_process_env() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
    assert "pod slice" in shard.multi_process_env()
    monkeypatch.setenv("KIPNB_DISTRIBUTED", "0")
    assert shard.multi_process_env() is None
    monkeypatch.delenv("KIPNB_DISTRIBUTED")
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert "JAX_COORDINATOR_ADDRESS" in shard.multi_process_env()
