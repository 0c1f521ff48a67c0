"""kipnb.nets: MTT's ConvNet and MLP as pure functions of parameter pytrees."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kipnb import data, nets


def convnet_param_formula(h, w, c, width, depth, classes, norm=True, pad=1):
    """Parameter count of MTT's ConvNet, from the architecture."""
    total, c_in = 0, c
    h, w = h + 2 * pad - 2, w + 2 * pad - 2
    for _ in range(depth):
        total += c_in * 3 * 3 * width + width  # conv weight + bias
        total += 2 * width if norm else 0  # GroupNorm(width, width) affine
        c_in = width
        h, w = h // 2, w // 2
    return total + h * w * width * classes + classes


def test_convnet3_param_count_matches_mtt():
    net = nets.ConvNet()  # width 128, depth 3, instancenorm, 10 classes
    params = net.init(jax.random.PRNGKey(0), (32, 32, 3))
    n = nets.count_params(params)
    assert n == convnet_param_formula(32, 32, 3, 128, 3, 10) == 320_010
    assert nets.flatten_params(params).shape == (n,)


@pytest.mark.parametrize(
    "shape,width,depth,norm,classes,pad",
    [((28, 28, 1), 4, 3, "instancenorm", 10, 1), ((28, 28, 1), 4, 3, "none", 10, 3),
     ((9, 13, 2), 5, 2, "instancenorm", 3, 1)],
)
def test_convnet_shapes_and_counts(shape, width, depth, norm, classes, pad):
    net = nets.ConvNet(width=width, depth=depth, norm=norm, num_classes=classes,
                       first_padding=pad)
    params = net.init(jax.random.PRNGKey(1), (2, *shape))
    assert nets.count_params(params) == convnet_param_formula(
        *shape, width, depth, classes, norm == "instancenorm", pad)
    assert ("norm" in params["block0"]) == (norm == "instancenorm")
    out = jax.jit(net.apply)(params, jnp.ones((3, *shape)))
    assert out.shape == (3, classes) and bool(jnp.all(jnp.isfinite(out)))


def test_mtt_mnist_padding_gives_4x4_features():
    assert nets.ConvNet(first_padding=3).feature_shape((28, 28, 1)) == (4, 4, 128)
    assert nets.ConvNet().feature_shape((28, 28, 1)) == (3, 3, 128)


def test_frepo_width_growth_doubles_the_channels_per_block():
    # FRePo's Conv (yongchao97/FRePo lib/models/networks.py): 128 / 256 / 512 channels,
    # first conv padded by 3 on 1-channel images, features 4 x 4 x 512 = 8192.
    net = nets.ConvNet(width=128, depth=3, norm="none", first_padding=3, width_growth=2)
    assert net.block_widths() == (128, 256, 512)
    params = net.init(jax.random.PRNGKey(0), (28, 28, 1))
    shapes = [params[f"block{d}"]["conv"]["w"].shape for d in range(3)]
    assert shapes == [(3, 3, 1, 128), (3, 3, 128, 256), (3, 3, 256, 512)]
    assert params["head"]["w"].shape == (8192, 10)
    expected = (9 * 1 * 128 + 128) + (9 * 128 * 256 + 256) + (9 * 256 * 512 + 512) + 8192 * 10 + 10
    assert nets.count_params(params) == expected
    small = nets.ConvNet(width=4, depth=2, width_growth=3)  # instance norm sized per block
    p = small.init(jax.random.PRNGKey(1), (8, 8, 1))
    assert p["block1"]["norm"]["scale"].shape == (12,)
    assert small.features(p, jnp.ones((2, 8, 8, 1))).shape == (2, 2 * 2 * 12)
    with pytest.raises(ValueError, match="width_growth"):
        nets.ConvNet(width_growth=0)


def test_mlp_counts_and_shapes():
    net = nets.MLP()  # MTT's: 2 hidden layers of 128
    params = net.init(jax.random.PRNGKey(0), (32, 32, 3))
    assert nets.count_params(params) == 3072 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert net.apply(params, jnp.ones((4, 32, 32, 3))).shape == (4, 10)
    p0 = nets.MLP(depth=0, num_classes=3).init(jax.random.PRNGKey(0), (5,))
    assert nets.MLP(depth=0, num_classes=3).apply(p0, jnp.ones((2, 5))).shape == (2, 3)
    with pytest.raises(ValueError, match="initialized for 3072"):
        net.apply(params, jnp.ones((4, 28, 28, 1)))


def test_torch_style_init_bounds():
    net = nets.ConvNet(width=64, depth=2)
    params = net.init(jax.random.PRNGKey(0), (16, 16, 3))
    for w, fan_in in [(params["block0"]["conv"]["w"], 27), (params["block1"]["conv"]["w"], 576),
                      (params["block0"]["conv"]["b"], 27), (params["head"]["w"], 4 * 4 * 64)]:
        bound = 1 / math.sqrt(fan_in)
        assert float(jnp.max(jnp.abs(w))) <= bound
        assert float(jnp.max(jnp.abs(w))) > 0.8 * bound
    assert bool(jnp.all(params["block0"]["norm"]["scale"] == 1))
    assert bool(jnp.all(params["block0"]["norm"]["bias"] == 0))
    other = net.init(jax.random.PRNGKey(1), (16, 16, 3))
    assert not np.allclose(other["head"]["w"], params["head"]["w"])


def test_instance_norm_statistics():
    x = jnp.asarray(3.0 + 2.0 * np.random.default_rng(0).standard_normal((4, 6, 5, 7)),
                    jnp.float32)
    c = x.shape[-1]
    y = nets.instance_norm(x, jnp.ones(c), jnp.zeros(c))
    np.testing.assert_allclose(jnp.mean(y, axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, axis=(1, 2)), 1, atol=1e-4)
    scale, bias = jnp.arange(1.0, c + 1), jnp.linspace(-1, 1, c)
    z = nets.instance_norm(x, scale, bias)
    np.testing.assert_allclose(jnp.mean(z, axis=(1, 2)), np.broadcast_to(bias, (4, c)), atol=1e-5)
    np.testing.assert_allclose(jnp.std(z, axis=(1, 2)), np.broadcast_to(scale, (4, c)), rtol=1e-4)


def test_flatten_unflatten_roundtrip():
    net = nets.ConvNet(width=8, depth=2)
    params = net.init(jax.random.PRNGKey(0), (8, 8, 1))
    vec = nets.flatten_params(params)
    back = nets.unflatten_params(vec, params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    moved = nets.unflatten_params(vec + 1.0, params)
    np.testing.assert_allclose(nets.flatten_params(moved), vec + 1.0)
    jitted = jax.jit(lambda v: nets.flatten_params(nets.unflatten_params(v, params)))
    np.testing.assert_array_equal(jitted(vec), vec)
    with pytest.raises(ValueError, match="expected shape"):
        nets.unflatten_params(vec[:-1], params)


def test_get():
    assert nets.get("convnet") == nets.ConvNet()
    assert nets.get("ConvNetD4").depth == 4
    assert nets.get("ConvNetW64", num_classes=100) == nets.ConvNet(width=64, num_classes=100)
    assert nets.get("ConvNetNN").norm == "none"
    assert nets.get("MLP", width=32) == nets.MLP(width=32)
    with pytest.raises(ValueError, match="Unknown network"):
        nets.get("resnet18")


def test_errors():
    net = nets.ConvNet(width=4, depth=2)
    params = net.init(jax.random.PRNGKey(0), (8, 8, 3))
    with pytest.raises(ValueError, match=r"NHWC images of shape \(N, H, W, C\)"):
        net.apply(params, jnp.ones((8, 8, 3)))
    with pytest.raises(ValueError, match="Channel mismatch: the images have 8 channels"):
        net.apply(params, jnp.ones((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="depth 4.*pool to 0x0. Use depth <= 3"):
        nets.ConvNet(depth=4).init(jax.random.PRNGKey(0), (8, 8, 1))
    with pytest.raises(ValueError, match="initialized for 16"):
        net.apply(params, jnp.ones((2, 16, 16, 3)))
    with pytest.raises(ValueError, match="Unknown norm 'layernorm'"):
        nets.ConvNet(norm="layernorm")
    with pytest.raises(ValueError, match="bn_decay must be a number in"):
        nets.ConvNet(norm="batchnorm", bn_decay=1.0)
    bn = nets.ConvNet(width=4, depth=2, norm="batchnorm")
    with pytest.raises(ValueError, match=r"needs its running statistics: pass state=net.init_state\(\)"):
        bn.apply(bn.init(jax.random.PRNGKey(0), (8, 8, 1)), jnp.ones((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        nets.ConvNet(width=0)
    with pytest.raises(ValueError, match="input_shape"):
        net.init(jax.random.PRNGKey(0), (8, 8))


def test_convnet_trains_on_digits():
    train, test = data.load("digits", "train"), data.load("digits", "test")
    net = nets.ConvNet(width=32, depth=2, num_classes=10)
    params = net.init(jax.random.PRNGKey(0), train.images.shape)
    opt = optax.adam(3e-3)
    state = opt.init(params)
    x, y = jnp.asarray(train.images), jnp.asarray(train.labels)

    @jax.jit
    def step(params, state, idx):
        def loss(p):
            logits = net.apply(p, x[idx])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

        g = jax.grad(loss)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state

    key = jax.random.PRNGKey(1)
    for _ in range(200):
        key, sub = jax.random.split(key)
        params, state = step(params, state, jax.random.choice(sub, len(train), (64,)))
    pred = jnp.argmax(net.apply(params, jnp.asarray(test.images)), -1)
    acc = float(jnp.mean(pred == jnp.asarray(test.labels)))
    assert acc > 0.8, acc


@pytest.mark.parametrize("pad, c", [(1, 3), (3, 1)])
def test_im2col_conv_equals_xla_conv_with_second_derivatives(pad, c):
    net = nets.ConvNet(width=6, depth=2, first_padding=pad)
    with jax.enable_x64(True):
        params = net.init(jax.random.PRNGKey(0), (10, 10, c), jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(1), (3, 10, 10, c), jnp.float64)
        np.testing.assert_allclose(net.apply(params, x, conv="im2col"), net.apply(params, x),
                                   rtol=1e-12, atol=1e-12)

        def meta(xx, conv):  # grad w.r.t. x of a loss after one gradient step on the params
            def loss(p):
                return jnp.sum(net.apply(p, xx, conv=conv) ** 2)
            g = jax.grad(loss)(params)
            p1 = jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, params, g)
            return jnp.sum(net.apply(p1, xx, conv=conv))

        g_x = jax.grad(meta)(x, "xla")
        g_i = jax.grad(meta)(x, "im2col")
        assert float(jnp.abs(g_x).max()) > 0
        np.testing.assert_allclose(g_i, g_x, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="Unknown conv 'fft'"):
        net.apply(params, x, conv="fft")


def _np_conv(x, w, b, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, wd, _ = x.shape
    out = np.zeros((n, h - 2, wd - 2, w.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,co->nhwo", x[:, i:i + h - 2, j:j + wd - 2], w[i, j])
    return out + b


def _np_pool(x):
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _np_frepo_conv(p, s, x, train, decay=0.1, eps=1e-5):
    """FRePo's Conv (yongchao97/FRePo lib/models/networks.py, flax BatchNorm on the input of
    blocks 1..depth-1), written out in numpy: logits and the new running statistics."""
    new = {}
    for d in range(len([k for k in p if k.startswith("block")])):
        blk = {k: {kk: np.asarray(v, np.float64) for kk, v in vv.items()}
               for k, vv in p[f"block{d}"].items()}
        if d > 0:
            if train:
                mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
                old = s[f"block{d}"]
                new[f"block{d}"] = {"mean": decay * np.asarray(old["mean"]) + (1 - decay) * mean,
                                    "var": decay * np.asarray(old["var"]) + (1 - decay) * var}
            else:
                mean, var = np.asarray(s[f"block{d}"]["mean"]), np.asarray(s[f"block{d}"]["var"])
            x = (x - mean) / np.sqrt(var + eps) * blk["norm"]["scale"] + blk["norm"]["bias"]
        x = _np_conv(x, blk["conv"]["w"], blk["conv"]["b"], 3 if d == 0 else 1)
        x = _np_pool(np.maximum(x, 0))
    x = x.reshape(x.shape[0], -1)
    return x @ np.asarray(p["head"]["w"], np.float64) + np.asarray(p["head"]["b"]), new


def test_batchnorm_norm_first_is_frepo_conv_in_train_and_inference_mode():
    net = nets.ConvNet(width=3, depth=3, norm="batchnorm", norm_first=True, first_padding=3,
                       width_growth=2, num_classes=4)
    params = net.init(jax.random.PRNGKey(0), (8, 8, 1))
    # non-trivial norm parameters and running statistics, so that every term is checked
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 8))
    for d in (1, 2):
        c = net.norm_widths()[d]
        params[f"block{d}"]["norm"] = {"scale": 1 + 0.3 * jax.random.normal(next(keys), (c,)),
                                       "bias": 0.2 * jax.random.normal(next(keys), (c,))}
    state = {k: {"mean": 0.1 * jax.random.normal(next(keys), v["mean"].shape),
                 "var": 0.5 + jax.random.uniform(next(keys), v["var"].shape)}
             for k, v in net.init_state().items()}
    assert sorted(state) == ["block1", "block2"] and "norm" not in params["block0"]
    assert net.norm_widths() == {1: 3, 2: 6}
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (5, 8, 8, 1)))

    logits, new_state = jax.jit(net.apply_train)(params, state, x)
    want, want_state = _np_frepo_conv(params, state, x.astype(np.float64), train=True)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    for k in want_state:
        for stat in ("mean", "var"):
            np.testing.assert_allclose(new_state[k][stat], want_state[k][stat], rtol=1e-4,
                                       atol=1e-6)
    inference = jax.jit(lambda p, s, x: net.apply(p, x, state=s))(params, state, x)
    want_inf, _ = _np_frepo_conv(params, state, x.astype(np.float64), train=False)
    np.testing.assert_allclose(inference, want_inf, rtol=1e-4, atol=1e-5)
    assert not np.allclose(inference, logits, atol=1e-3)  # the two modes differ
    # the running statistics get no gradient; the parameters do
    g = jax.grad(lambda p: jnp.sum(net.apply_train(p, state, x)[0] ** 2))(params)
    assert float(jnp.abs(g["block1"]["norm"]["scale"]).sum()) > 0


def test_norm_first_instancenorm_and_stateless_norms():
    net = nets.ConvNet(width=4, depth=2, norm="instancenorm", norm_first=True)
    params = net.init(jax.random.PRNGKey(0), (8, 8, 1))
    assert "norm" not in params["block0"] and params["block1"]["norm"]["scale"].shape == (4,)
    assert net.init_state() == {}
    logits, state = net.apply_train(params, {}, jnp.ones((2, 8, 8, 1)))
    np.testing.assert_allclose(logits, net.apply(params, jnp.ones((2, 8, 8, 1))))
    assert state == {}
    assert "batchnorm" in nets.NORMS and "batchnorm" not in nets.STATELESS_NORMS
