"""Label Solve on Fashion-MNIST: KRR test accuracy with solved vs one-hot labels.

    python benchmarks/ls_fashion.py --ipc 10 --kernel fc --out benchmarks/results/ls_fc_ipc10.json

Random class-balanced support sets of ``--ipc`` images per class; LS fits the labels to
``--n-targets`` training images (default: all 60000) and the accuracy is measured on
``--n-test`` test images (default: all 10000). The ConvNet kernel costs ~2 ms per pair on
a 2-core CPU, so on a CPU pass --n-targets/--n-test for it (all targets at 10 images per
class is 6M pairs). Published LS with a ConvNet kernel (Nguyen, Novak, Xiao, Lee 2021):
65.3 / 80.8 / 86.9 % at 1 / 10 / 50 images per class.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kipnb import archs, data, krr, preprocess  # noqa: E402
from kipnb.results import machine_info, write_json  # noqa: E402

PUBLISHED_CONV = {1: 65.3, 10: 80.8, 50: 86.9}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ipc", type=int, required=True)
    ap.add_argument("--kernel", choices=sorted(archs.ARCHS), default="conv")
    ap.add_argument("--get", choices=["ntk", "nngp"], default="ntk")
    ap.add_argument("--n-targets", type=int, default=None, help="training targets (default all)")
    ap.add_argument("--n-test", type=int, default=None, help="test images (default all)")
    ap.add_argument("--preprocess", default="standardize", choices=preprocess.METHODS)
    ap.add_argument("--reg", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=1000)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    t = preprocess.make(a.preprocess).fit(train.images)
    x_train, x_test = t.apply(train.images), t.apply(test.images)
    rng = np.random.default_rng(a.seed)
    tgt = rng.permutation(len(train))[: a.n_targets] if a.n_targets else np.arange(len(train))
    tst = rng.permutation(len(test))[: a.n_test] if a.n_test else np.arange(len(test))
    idx = data.class_balanced_indices(jax.random.key(a.seed), train.labels, a.ipc, 10)
    _, _, kernel_fn = archs.get(a.kernel)
    kw = dict(reg=a.reg, get=a.get, block_size=a.block_size)

    t0 = time.perf_counter()
    y_ls = krr.label_solve(
        kernel_fn, x_train[idx], x_train[tgt], krr.one_hot_targets(train.labels[tgt], 10), **kw
    )
    t_ls = time.perf_counter() - t0
    one_hot = krr.one_hot_targets(train.labels[idx], 10)
    acc_1h = krr.krr_evaluate(kernel_fn, x_train[idx], one_hot, x_test[tst], test.labels[tst], **kw)
    acc_ls = krr.krr_evaluate(kernel_fn, x_train[idx], y_ls, x_test[tst], test.labels[tst], **kw)
    result = {
        "benchmark": "ls_fashion",
        "ipc": a.ipc,
        "kernel": a.kernel,
        "get": a.get,
        "preprocess": a.preprocess,
        "reg": a.reg,
        "seed": a.seed,
        "n_targets": int(len(tgt)),
        "n_test": int(len(tst)),
        "ls_test_acc": acc_ls["accuracy"],
        "one_hot_test_acc": acc_1h["accuracy"],
        "published_ls_conv_acc": PUBLISHED_CONV.get(a.ipc),
        "label_solve_seconds": t_ls,
        "wall_seconds": time.perf_counter() - t_start,
        "machine": machine_info(),
    }
    write_json(a.out, result)
    print(
        f"LS {a.kernel} {a.get} ipc={a.ipc}: test acc {100 * acc_ls['accuracy']:.2f}% "
        f"(one-hot {100 * acc_1h['accuracy']:.2f}%; published conv "
        f"{PUBLISHED_CONV.get(a.ipc)}) on {len(tst)} test images, {len(tgt)} targets, "
        f"{result['wall_seconds']:.0f} s -> {a.out}"
    )
    return result


if __name__ == "__main__":
    main()
