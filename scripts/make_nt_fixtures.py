"""Reference NNGP/NTK values from real neural-tangents 0.6.5 for tests/test_stax.py.

neural-tangents 0.6.5 does not import on the JAX kipnb uses, so this script runs in a
separate, pinned environment (Python 3.11)::

    make ntenv                                  # the pinned environment, in build/ntenv
    build/ntenv/bin/python scripts/make_nt_fixtures.py      # -> tests/fixtures/nt_reference.npz

It needs nothing from kipnb. For every case it stores, in float64:

* ``<case>/arch``: the network as a Python expression over the ``stax`` constructors
  (the test evaluates the same string with ``kipnb.stax``),
* ``<case>/x1``, ``<case>/x2``: inputs drawn with a fixed numpy seed,
* ``<case>/nngp``, ``<case>/ntk``: ``kernel_fn(x1, x2)``; ``<case>/nngp_same``,
  ``<case>/ntk_same``: ``kernel_fn(x1, None)``,
* ``<case>/grad_ntk`` (for the cases in ``GRADIENT_CASES``): the gradient w.r.t. ``x1``
  of ``sum(R * ntk(x1, x2))`` with ``R = weights(ntk.shape)`` (a fixed cosine pattern,
  recomputed by the test),

plus ``meta/versions``. The file is deterministic (same inputs, same numbers up to
floating-point reproducibility of XLA on the machine).

It also writes ``tests/fixtures/nt_kip_fc1.npz``: a short KIP run in the setting of
Google Research's ``kip/KIP.ipynb`` colab (FC-1 NTK, ``W_std = sqrt(2)``, ``b_std = 0.1``,
``kernel_fn(x_s, x_s)``, ``reg = 1e-6`` relative to ``trace/n``, ``solve(...,
assume_a='pos')``, ``0.5 * mean`` squared error, Adam of ``jax.example_libraries`` at
learning rate 0.04, labels fixed), float64, at small sizes: ``x_pool``/``y_pool`` (the
targets), ``batches`` (per step, the pool rows of its target batch), ``x_init``,
``y_init`` (the support set), ``losses`` (the loss of every step) and ``x_final``.
``tests/test_kip.py`` runs the same code with ``from kipnb import stax``.

And ``tests/fixtures/nt_nn_training.npz``: the learning-rate cell of Google Research's
``kip/nn_training.ipynb`` at small sizes (its ConvNet with a prepended conv layer,
standard parameterization, ``nt.batch`` over ``nt.empirical_ntk_fn(logit_reduced_f,
trace_axes=(), vmap_axes=0, implementation=1)`` with ``batch_size``, then
``nt.predict.max_learning_rate``, whose CPU branch fails on current SciPy, so its
accelerator branch is used): ``x``, ``params/<i>`` (the network's parameter leaves
from neural-tangents' ``init_fn``, in ``tree_leaves`` order), ``kernel`` and ``max_lr``;
``ntk_full`` (the un-reduced ``(N, N, 10, 10)`` NTK, ``trace_axes=()``) with ``max_lr_full``
(``y_train_size`` inferred) and ``max_lr_momentum`` (``momentum=0.9``).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

CONV3 = ("Conv(16, (3, 3), padding='SAME', W_std=1.4, b_std=0.1), Relu(), "
         "AvgPool((2, 2), (2, 2))")

# name -> (architecture expression, x1 shape, x2 shape)
CASES: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "fc3_bias": (
        "serial(Dense(64, W_std=1.5, b_std=0.1), Relu(), Dense(64, W_std=1.5, b_std=0.1), "
        "Relu(), Dense(64, W_std=1.5, b_std=0.1), Relu(), Dense(1, W_std=1.5, b_std=0.1))",
        (5, 12), (4, 12)),
    "fc2_nobias": (
        "serial(Dense(32), Relu(), Dense(32, W_std=2.0), Relu(), Dense(3))",
        (4, 7), (3, 7)),
    "erf_net": (
        "serial(Dense(32, W_std=1.3, b_std=0.2), Erf(), Dense(32, W_std=1.3, b_std=0.2), "
        "Erf(a=0.7, b=1.2, c=0.1), Dense(1, W_std=0.9, b_std=0.05))",
        (4, 9), (3, 9)),
    "fc_standard": (
        "serial(Dense(48, W_std=1.2, b_std=0.3, parameterization='standard'), Relu(), "
        "Dense(24, W_std=1.1, b_std=0.2, parameterization='standard'), LeakyRelu(0.1), "
        "Dense(1, W_std=0.8, b_std=0.1, parameterization='standard'))",
        (4, 6), (3, 6)),
    "standard_s": (
        "serial(Dense(16, W_std=1.2, b_std=0.1, parameterization='standard', s=(1, 2)), "
        "Relu(), Dense(8, W_std=1.1, parameterization='standard', s=(2, 3)), Relu(), "
        "Dense(1, b_std=0.2, parameterization='standard', s=(3, 1)))",
        (4, 6), (3, 6)),
    "conv_standard_s": (
        "serial(Conv(4, (3, 3), padding='SAME', b_std=0.1, parameterization='standard', "
        "s=(1, 2)), Relu(), Conv(3, (2, 2), W_std=1.3, parameterization='standard', "
        "s=(2, 1)), Relu(), Flatten(), Dense(1, parameterization='standard'))",
        (3, 6, 6, 2), (2, 6, 6, 2)),
    "conv_flatten": (
        "serial(Conv(16, (3, 3), padding='SAME', W_std=1.4, b_std=0.1), Relu(), "
        "Conv(16, (3, 3), padding='SAME', W_std=1.4, b_std=0.1), Relu(), Flatten(), "
        "Dense(1, W_std=1.2, b_std=0.05))",
        (4, 8, 8, 2), (3, 8, 8, 2)),
    "convnet3_8x8": (
        f"serial({CONV3}, {CONV3}, {CONV3}, Flatten(), Dense(10))",
        (4, 8, 8, 2), (3, 8, 8, 2)),
    "convnet3_16x16": (
        f"serial({CONV3}, {CONV3}, {CONV3}, Flatten(), Dense(10))",
        (3, 16, 16, 1), (2, 16, 16, 1)),
    "gap_net": (
        "serial(Conv(16, (3, 3), padding='SAME', W_std=1.3), Relu(), "
        "Conv(16, (3, 3), padding='VALID', W_std=1.3, b_std=0.2), Relu(), GlobalAvgPool(), "
        "Dense(1, W_std=1.1, b_std=0.1))",
        (4, 6, 6, 3), (3, 6, 6, 3)),
    "strides_valid": (
        "serial(Conv(16, (3, 3), strides=(2, 2), padding='VALID', W_std=1.5, b_std=0.3), "
        "Relu(), Conv(16, (2, 3), strides=(1, 2), padding='SAME'), Relu(), "
        "AvgPool((2, 2), strides=(1, 1), padding='SAME'), Flatten(), Dense(1))",
        (3, 11, 9, 2), (2, 11, 9, 2)),
    "strided_band": (
        "serial(Conv(16, (3, 3), strides=(2, 2), padding='SAME', W_std=1.3, b_std=0.1), "
        "Relu(), AvgPool((2, 2), (2, 2)), Flatten(), Dense(1))",
        (3, 16, 16, 1), (2, 16, 16, 1)),
    "erf_pool_band": (
        "serial(Conv(16, (3, 3), padding='SAME', W_std=1.2, b_std=0.2), "
        "Erf(a=1.1, b=0.9, c=0.3), AvgPool((2, 2), (2, 2)), "
        "Conv(16, (3, 3), padding='SAME', W_std=1.2), Erf(), AvgPool((2, 2), (2, 2)), "
        "Flatten(), Dense(1, b_std=0.1))",
        (3, 12, 12, 2), (2, 12, 12, 2)),
    "conv_standard": (
        "serial(Conv(8, (3, 3), padding='SAME', W_std=1.3, b_std=0.2, "
        "parameterization='standard'), Relu(), AvgPool((2, 2), (2, 2)), "
        "Conv(12, (2, 2), padding='VALID', W_std=1.1, b_std=0.1, parameterization='standard'), "
        "Relu(), Flatten(), Dense(1, W_std=0.9, b_std=0.1, parameterization='standard'))",
        (3, 8, 8, 2), (2, 8, 8, 2)),
    "pool_same_edges": (
        "serial(Conv(16, (3, 3), padding='SAME'), Abs(), "
        "AvgPool((3, 3), strides=(2, 2), padding='SAME', normalize_edges=True), "
        "Conv(16, (2, 2), padding='SAME'), Relu(), "
        "AvgPool((3, 2), padding='SAME'), Flatten(), Dense(1))",
        (3, 7, 6, 2), (2, 7, 6, 2)),
    "band_to_full": (
        "serial(Conv(8, (5, 5), W_std=1.3, b_std=0.1), Relu(), AvgPool((5, 5)), "
        "Conv(8, (2, 2), padding='SAME'), Relu(), Flatten(), Dense(1))",
        (3, 12, 12, 1), (2, 12, 12, 1)),
    "conv1d": (
        "serial(Conv(16, (3,), padding='SAME', b_std=0.1), Relu(), AvgPool((2,), (2,)), "
        "Conv(16, (3,), padding='VALID'), Relu(), Flatten(), Dense(1))",
        (3, 14, 3), (2, 14, 3)),
    "conv3d": (
        "serial(Conv(8, (2, 2, 2), padding='SAME', b_std=0.1), Relu(), "
        "AvgPool((2, 2, 2), (2, 2, 2)), Conv(8, (2, 2, 2), padding='SAME'), Relu(), "
        "Flatten(), Dense(1))",
        (3, 6, 4, 4, 1), (2, 6, 4, 4, 1)),
    "flatten_first": (
        "serial(Flatten(), Dense(32, b_std=0.1), Relu(), Dense(1))",
        (3, 5, 5, 2), (2, 5, 5, 2)),
    "spatial_output": (
        "serial(Conv(16, (3, 3), padding='SAME', b_std=0.1), Relu(), Conv(4, (2, 2)))",
        (3, 5, 5, 2), (2, 5, 5, 2)),
    # Gelu and LayerNorm (issue 15; appended, so the inputs of the cases above are unchanged).
    "gelu_fc": (
        "serial(Dense(32, W_std=1.3, b_std=0.2), Gelu(), Dense(32, W_std=1.2, b_std=0.1), "
        "Gelu(approximate=True), Dense(1, W_std=0.9, b_std=0.05))",
        (4, 9), (3, 9)),
    "layernorm_fc": (
        "serial(Dense(32, W_std=1.5, b_std=0.1), LayerNorm(), Relu(), "
        "Dense(16, W_std=1.2, b_std=0.2, parameterization='standard'), "
        "LayerNorm(axis=-1, eps=0.1), Gelu(), Dense(1, b_std=0.1))",
        (4, 7), (3, 7)),
    "layernorm_conv_band": (
        "serial(Conv(8, (3, 3), padding='SAME', W_std=1.3, b_std=0.1), LayerNorm(), Relu(), "
        "AvgPool((2, 2), (2, 2)), Conv(8, (3, 3), padding='SAME', W_std=1.2), "
        "LayerNorm(axis=-1, eps=0.01), Gelu(), AvgPool((2, 2), (2, 2)), Flatten(), "
        "Dense(1, b_std=0.1))",
        (3, 12, 12, 2), (2, 12, 12, 2)),
    # The ConvNet of Google Research's kip/nn_training.ipynb (prepended conv, blocks of
    # conv, LayerNorm over (H, W, C), activation, 2x2 pooling; standard parameterization).
    "nn_training_convnet": (
        "serial(Conv(16, (3, 3), padding='SAME', W_std=1.4142135623730951, b_std=0.1, "
        "parameterization='standard'), Relu(), "
        "Conv(16, (3, 3), padding='SAME', W_std=1.4142135623730951, b_std=0.1, "
        "parameterization='standard'), LayerNorm(axis=(1, 2, 3)), Relu(), "
        "AvgPool((2, 2), strides=(2, 2)), "
        "Conv(16, (3, 3), padding='SAME', W_std=1.4142135623730951, b_std=0.1, "
        "parameterization='standard'), LayerNorm(axis=(1, 2, 3)), Relu(), "
        "AvgPool((2, 2), strides=(2, 2)), Flatten(), "
        "Dense(10, 1.4142135623730951, 0.1, parameterization='standard'))",
        (3, 8, 8, 3), (2, 8, 8, 3)),
    "layernorm_gelu_gap": (
        "serial(Conv(8, (3, 3), padding='SAME', W_std=1.4, b_std=0.1), "
        "LayerNorm(axis=(1, 2, 3), eps=0.05), Gelu(), Conv(8, (2, 2), W_std=1.3), "
        "LayerNorm(axis=(2, 3)), Gelu(), GlobalAvgPool(), Dense(1, b_std=0.1))",
        (3, 6, 5, 2), (2, 6, 5, 2)),
}


# Cases that also store a gradient: dense, Erf, standard parameterization, banded conv +
# pool storage, full storage (GlobalAvgPool). Kept few: the test compiles each gradient.
GRADIENT_CASES = ("fc3_bias", "erf_net", "standard_s", "strided_band", "gap_net", "gelu_fc",
                  "layernorm_conv_band")


def weights(shape) -> np.ndarray:
    """Fixed weights for the gradient check (the test has an identical copy)."""
    n = int(np.prod(shape))
    return np.cos(0.7 * np.arange(n) + 0.3).reshape(shape)


def build(arch: str):
    names = {n: getattr(stax, n) for n in (
        "serial", "Dense", "Conv", "Relu", "LeakyRelu", "Abs", "Erf", "AvgPool",
        "GlobalAvgPool", "Flatten", "Gelu", "LayerNorm")}
    return eval(arch, {"__builtins__": {}}, names)  # noqa: S307 - our own constant strings


# The short KIP run of tests/test_kip.py: sizes, steps and seed (the test reads them back).
KIP_RUN = {"support": 10, "pool": 200, "batch": 100, "image": (7, 7, 1), "steps": 15,
           "learning_rate": 0.04, "seed": 20240602}


def colab_fc1_kip(stax, *args, **kwargs):
    """The colab's FC-1 KIP loop with neural-tangents' stax (see scripts/colab_kip.py)."""
    import colab_kip  # beside this script; shared with tests/test_kip.py

    return colab_kip.colab_fc1_kip(stax, *args, **kwargs)


def kip_fixture(out: Path, versions: dict) -> None:
    run = KIP_RUN
    rng = np.random.default_rng(run["seed"])
    x_pool = rng.standard_normal((run["pool"], *run["image"]))
    labels = rng.integers(0, 10, run["pool"])
    y_pool = np.eye(10)[labels] - 0.1
    x_init = rng.standard_normal((run["support"], *run["image"]))
    y_init = np.eye(10)[np.arange(run["support"]) % 10] - 0.1
    batches = np.stack([rng.choice(run["pool"], run["batch"], replace=False)
                        for _ in range(run["steps"])])
    losses, x_final = colab_fc1_kip(stax, x_init, y_init, x_pool, y_pool, batches,
                                    run["learning_rate"])
    np.savez_compressed(out, x_pool=x_pool, y_pool=y_pool, x_init=x_init, y_init=y_init,
                        batches=batches, losses=losses, x_final=x_final,
                        run=np.array(json.dumps(run)), versions=np.array(json.dumps(versions)))
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB), losses {losses[0]:.6g} -> "
          f"{losses[-1]:.6g}")


# The nn_training.ipynb learning-rate cell of tests/test_stax.py (the test reads it back).
NN_TRAINING = {"n": 12, "image": (8, 8, 3), "width": 8, "depth": 2, "batch_size": 4,
               "seed": 20240603}


def nn_training_fixture(out: Path, versions: dict) -> None:
    run = NN_TRAINING
    x = np.random.default_rng(run["seed"]).standard_normal((run["n"], *run["image"]))
    import colab_nn_training  # beside this script; shared with tests/test_stax.py

    init_fn, f, _ = colab_nn_training.convnet(stax, run["width"], run["depth"])
    _, params = init_fn(jax.random.PRNGKey(0), (-1, *run["image"]))
    # On CPU neural-tangents 0.6.5 calls scipy.linalg.eigvalsh(..., eigvals=...), a keyword
    # SciPy 1.14 removed (TypeError); its accelerator branch, jnp.linalg.eigvalsh, is the
    # same formula, so that is the one used here.
    import neural_tangents._src.predict as nt_predict

    nt_predict._is_on_cpu = lambda x: False
    kernel, max_lr = colab_nn_training.max_lr_estimate(nt, f, params, x, run["batch_size"])
    ntk_full = nt.empirical_ntk_fn(f, trace_axes=())(x, None, params)
    leaves = jax.tree_util.tree_leaves(params)
    np.savez_compressed(
        out, x=x, kernel=np.asarray(kernel), max_lr=np.asarray(max_lr),
        ntk_full=np.asarray(ntk_full),
        max_lr_full=np.asarray(nt.predict.max_learning_rate(ntk_full)),
        max_lr_momentum=np.asarray(nt.predict.max_learning_rate(
            ntk_full, y_train_size=run["n"] * 10, momentum=0.9)),
        **{f"params/{i}": np.asarray(v) for i, v in enumerate(leaves)},
        run=np.array(json.dumps(run)), versions=np.array(json.dumps(versions)))
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB), kernel {kernel.shape}, "
          f"max_lr {float(max_lr):.6g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1]
                                         / "tests" / "fixtures" / "nt_reference.npz"))
    ap.add_argument("--kip-out", default=str(Path(__file__).resolve().parents[1]
                                             / "tests" / "fixtures" / "nt_kip_fc1.npz"))
    ap.add_argument("--nn-training-out", default=str(
        Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nt_nn_training.npz"))
    ap.add_argument("--only-kip", action="store_true",
                    help="write only the KIP trajectory fixture")
    ap.add_argument("--only-nn-training", action="store_true",
                    help="write only the nn_training.ipynb learning-rate fixture")
    args = ap.parse_args()
    if args.only_kip or args.only_nn_training:
        versions = {"neural_tangents": nt.__version__, "jax": jax.__version__,
                    "numpy": np.__version__, "python": platform.python_version()}
        if args.only_kip:
            kip_fixture(Path(args.kip_out), versions)
        if args.only_nn_training:
            nn_training_fixture(Path(args.nn_training_out), versions)
        return
    rng = np.random.default_rng(20240601)
    arrays: dict[str, np.ndarray] = {}
    for name, (arch, s1, s2) in CASES.items():
        x1 = rng.standard_normal(s1)
        x2 = rng.standard_normal(s2)
        _, _, kernel_fn = build(arch)
        k = kernel_fn(x1, x2, ("nngp", "ntk"))
        ks = kernel_fn(x1, None, ("nngp", "ntk"))
        arrays.update({
            f"{name}/arch": np.array(arch),
            f"{name}/x1": x1, f"{name}/x2": x2,
            f"{name}/nngp": np.asarray(k.nngp), f"{name}/ntk": np.asarray(k.ntk),
            f"{name}/nngp_same": np.asarray(ks.nngp), f"{name}/ntk_same": np.asarray(ks.ntk),
        })
        if name in GRADIENT_CASES:
            R = weights(np.shape(k.ntk))

            def loss(a, kernel_fn=kernel_fn, x2=x2, R=R):
                return jnp.sum(R * kernel_fn(a, x2, "ntk"))

            arrays[f"{name}/grad_ntk"] = np.asarray(jax.grad(loss)(jnp.asarray(x1)))
        assert np.asarray(k.ntk).dtype == np.float64
        print(f"{name:18s} nngp {np.shape(k.nngp)}  max|ntk| {np.max(np.abs(k.ntk)):.4g}")
    versions = {"neural_tangents": nt.__version__, "jax": jax.__version__,
                "numpy": np.__version__, "python": platform.python_version()}
    arrays["meta/versions"] = np.array(json.dumps(versions))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB), {versions}")
    kip_fixture(Path(args.kip_out), versions)
    nn_training_fixture(Path(args.nn_training_out), versions)


if __name__ == "__main__":
    main()
