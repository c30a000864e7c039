"""NAMAttention against a NumPy transcription of SPEC section 2."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nam_keras import NAMAttention, build_resnet

EPS = 1e-5


def np_bn(x, axes, mean, var, gamma, beta):
    shape = [1] * x.ndim
    feat = next(a for a in range(x.ndim) if a not in axes)
    shape[feat] = -1
    r = lambda v: np.reshape(v, shape)
    return (x - r(mean)) / np.sqrt(r(var) + EPS) * r(gamma) + r(beta)


def np_gate(x, y, gamma, feat_axis):
    w = np.abs(gamma) / np.abs(gamma).sum()
    shape = [1] * x.ndim
    shape[feat_axis] = -1
    return 1.0 / (1.0 + np.exp(-np.reshape(w, shape) * y)) * x


def np_nam(x, cg, cb, cm, cv, sg=None, sb=None, sm=None, sv=None, training=True):
    """NumPy NAM: channel gate, then (optionally) pixel gate on the result."""
    if training:
        cm, cv = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    out = np_gate(x, np_bn(x, (0, 1, 2), cm, cv, cg, cb), cg, 3)
    if sg is not None:
        n, h, w, c = out.shape
        flat = out.reshape(n, h * w, c)
        if training:
            sm, sv = flat.mean(axis=(0, 2)), flat.var(axis=(0, 2))
        out = np_gate(flat, np_bn(flat, (0, 2), sm, sv, sg, sb), sg, 1).reshape(n, h, w, c)
    return out


def randomise(bn, rng, n):
    vals = [
        rng.normal(size=n) * 2.0,
        rng.normal(size=n),
        rng.normal(size=n),
        rng.uniform(0.5, 2.0, n),
    ]
    for var, val in zip([bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance], vals):
        var.assign(val.astype("float32"))
    return vals


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("spatial", [False, True])
def test_matches_numpy(rng, training, spatial):
    x = rng.normal(1.0, 3.0, size=(4, 5, 6, 7)).astype("float32")
    layer = NAMAttention(spatial=spatial)
    layer.build(x.shape)
    c = randomise(layer.channel_bn, rng, 7)
    s = randomise(layer.spatial_bn, rng, 30) if spatial else [None] * 4
    got = keras.ops.convert_to_numpy(layer(x, training=training))
    want = np_nam(x.astype("float64"), *c, *s, training=training)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_moving_statistics_momentum_0_9(rng):
    x = rng.normal(2.0, 3.0, size=(8, 4, 4, 5)).astype("float32")
    layer = NAMAttention()
    layer.build(x.shape)
    m0, v0 = rng.normal(size=5), rng.uniform(0.5, 2.0, 5)
    layer.channel_bn.moving_mean.assign(m0.astype("float32"))
    layer.channel_bn.moving_variance.assign(v0.astype("float32"))
    layer(x, training=True)
    np.testing.assert_allclose(
        np.asarray(layer.channel_bn.moving_mean), 0.9 * m0 + 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(layer.channel_bn.moving_variance),
        0.9 * v0 + 0.1 * x.var(axis=(0, 1, 2)),
        rtol=1e-5,
    )
    assert layer.channel_bn.epsilon == 1e-5
    # Inference leaves them alone.
    before = np.asarray(layer.channel_bn.moving_mean).copy()
    layer(x, training=False)
    np.testing.assert_array_equal(np.asarray(layer.channel_bn.moving_mean), before)


def test_zero_gamma_is_guarded(rng):
    x = rng.normal(size=(2, 3, 3, 4)).astype("float32")
    layer = NAMAttention()
    layer.build(x.shape)
    layer.channel_bn.gamma.assign(np.zeros(4, "float32"))
    out = keras.ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_allclose(out, 0.5 * x, rtol=1e-6)  # w = 0 -> sigmoid(0) = 0.5


@pytest.mark.parametrize("spatial", [False, True])
def test_penalty_value(rng, spatial):
    x = rng.normal(size=(2, 3, 3, 4)).astype("float32")
    layer = NAMAttention(spatial=spatial, sparsity=3e-3)
    layer.build(x.shape)
    g = randomise(layer.channel_bn, rng, 4)[0]
    total = np.abs(g).sum()
    if spatial:
        total += np.abs(randomise(layer.spatial_bn, rng, 9)[0]).sum()
    layer(x)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), 3e-3 * total, rtol=1e-6)


def _nam_model(sparsity):
    inputs = keras.Input((3, 3, 4))
    return keras.Model(inputs, NAMAttention(sparsity=sparsity, name="nam")(inputs))


@pytest.mark.tensorflow_only
def test_penalty_reaches_model_losses_and_fit(rng):
    """`fit` minimises cross-entropy + p * sum|gamma|: with a data loss of zero
    gradient, one SGD step moves gamma by exactly -lr * p * sign(gamma)."""
    model = _nam_model(sparsity=0.01)
    bn = model.get_layer("nam").channel_bn
    gamma0 = np.array([1.0, -2.0, 0.5, 3.0], "float32")
    bn.gamma.assign(gamma0)
    x = rng.normal(size=(4, 3, 3, 4)).astype("float32")
    model(x)
    np.testing.assert_allclose(float(sum(model.losses)), 0.01 * 6.5, rtol=1e-6)

    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=lambda yt, yp: 0.0 * keras.ops.mean(yp))
    # evaluate reports the total loss the trainer minimises
    np.testing.assert_allclose(model.evaluate(x, x, verbose=0), 0.065, rtol=1e-5)
    model.fit(x, x, batch_size=4, epochs=1, verbose=0)
    np.testing.assert_allclose(
        np.asarray(bn.gamma), gamma0 - 0.5 * 0.01 * np.sign(gamma0), rtol=1e-6
    )


def _gamma_grad(layer, x):
    with tf.GradientTape() as tape:
        out = layer(x, training=True)
        loss = tf.reduce_sum(out * out)
    return np.asarray(tape.gradient(loss, layer.channel_bn.gamma))


@pytest.mark.tensorflow_only
def test_stop_gradient_option(rng):
    x = rng.normal(size=(4, 3, 3, 5)).astype("float32")
    gamma = rng.normal(size=5).astype("float32")
    grads = {}
    for stop in (False, True):
        layer = NAMAttention(sparsity=0, stop_gradient=stop)
        layer.build(x.shape)
        layer.channel_bn.gamma.assign(gamma)
        grads[stop] = _gamma_grad(layer, x)

    # Hand computation of the detached case: w is a constant, gamma only
    # enters through y = xhat * gamma + beta.
    g = tf.Variable(gamma)
    w = tf.constant(np.abs(gamma) / np.abs(gamma).sum())
    mean, var = tf.nn.moments(tf.constant(x), axes=[0, 1, 2])
    with tf.GradientTape() as tape:
        y = (x - mean) / tf.sqrt(var + EPS) * g
        out = tf.sigmoid(w * y) * x
        loss = tf.reduce_sum(out * out)
    np.testing.assert_allclose(
        grads[True], np.asarray(tape.gradient(loss, g)), rtol=1e-4, atol=1e-6
    )
    assert not np.allclose(grads[False], grads[True], rtol=1e-3)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_dtype_policies(rng, policy):
    x = rng.normal(size=(4, 4, 4, 128)).astype("float32")
    ref = NAMAttention()
    ref.build(x.shape)
    # sum |gamma| = 128,000 overflows float16 (max 65,504): the weights and the
    # penalty must still be right.
    big = np.full(128, 1000.0, "float32")
    ref.channel_bn.gamma.assign(big)
    want = keras.ops.convert_to_numpy(ref(x, training=False))

    layer = NAMAttention(dtype=policy)
    layer.build(x.shape)
    layer.channel_bn.gamma.assign(big)
    out = layer(x, training=False)
    # float32_gate (the default): the gate, the product and the output in float32
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert layer.compute_dtype == keras.DTypePolicy(policy).compute_dtype
    assert layer.channel_bn.gamma.dtype == "float32"
    (penalty,) = layer.losses
    assert keras.backend.standardize_dtype(penalty.dtype) == "float32"
    np.testing.assert_allclose(float(penalty), 1e-4 * 128000.0, rtol=1e-6)
    tol = {"float32": 1e-6, "mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}[policy]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out).astype("float32"), want, rtol=tol, atol=tol
    )


def test_mixed_policy_gate_is_float32_and_the_penalty_too(rng):
    layer = NAMAttention(spatial=True, dtype="mixed_bfloat16")
    out = layer(rng.normal(size=(2, 4, 4, 8)).astype("float32"), training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"  # float32_gate
    assert layer.channel_bn.dtype_policy.name == "mixed_bfloat16"
    assert layer.spatial_bn.dtype_policy.name == "mixed_bfloat16"
    legacy = NAMAttention(spatial=True, float32_gate=False, dtype="mixed_bfloat16")
    out = legacy(rng.normal(size=(2, 4, 4, 8)).astype("float32"), training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.losses[0].dtype) == "float32"


def test_non_default_arguments_survive_the_config_and_reach_the_bns():
    """The contract test round-trips the defaults; here NAM's own options."""
    layer = NAMAttention(
        spatial=True,
        channel=False,
        sparsity=2e-4,
        stop_gradient=True,
        epsilon=1e-3,
        momentum=0.8,
        synchronized=True,
        float32_gate=False,
        name="n",
    )
    clone = NAMAttention.from_config(layer.get_config())
    for key in ("channel", "spatial", "sparsity", "stop_gradient", "float32_gate", "name"):
        assert getattr(clone, key) == getattr(layer, key), key
    assert clone.channel_bn is None
    bn = clone.spatial_bn
    assert (bn.epsilon, bn.momentum, bn.get_config()["synchronized"]) == (1e-3, 0.8, True)


@pytest.mark.parametrize(
    "kwargs, shape, message",
    [
        ({}, (2, 4, 4), "rank-4 input"),
        ({"spatial": True}, (2, None, None, 4), "static height and width"),
    ],
)
def test_bad_input_shapes(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        NAMAttention(**kwargs).build(shape)


def test_rank_3_call_is_rejected():
    with pytest.raises(ValueError, match="rank-4"):
        NAMAttention()(np.zeros((2, 4, 4), "float32"))


def test_spatial_needs_static_shape_in_functional_model():
    with pytest.raises(ValueError, match="static height and width"):
        NAMAttention(spatial=True)(keras.Input((None, None, 8)))


@pytest.mark.parametrize("bad", [-1e-4, float("nan"), "x"])
def test_negative_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        NAMAttention(sparsity=bad)


def test_needs_channel_or_spatial():
    with pytest.raises(ValueError, match="channel=True, spatial=True or both"):
        NAMAttention(channel=False, spatial=False)


# ------------------------------------------------------------------ the fast path


def _nam_pair(shape, rng, **kwargs):
    """The fast NAM (fused BN with w folded in) and the keras.ops reference."""
    fast, ref = NAMAttention(**kwargs), NAMAttention(**kwargs)
    for layer in (fast, ref):
        layer.build(shape)
    ref.channel_bn.fused = False
    values = randomise(fast.channel_bn, rng, shape[-1])
    for var, value in zip(
        (
            ref.channel_bn.gamma,
            ref.channel_bn.beta,
            ref.channel_bn.moving_mean,
            ref.channel_bn.moving_variance,
        ),
        values,
    ):
        var.assign(value.astype("float32"))
    return fast, ref


def _run(layer, x, training):
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, training=training)
        (penalty,) = layer.losses
        loss = tf.reduce_sum(tf.cast(out, "float32") * tf.cos(tf.cast(out, "float32"))) + penalty
    bn = layer.channel_bn
    grads = tape.gradient(loss, [x, bn.gamma, bn.beta])
    return [np.asarray(tf.cast(t, "float32")) for t in (out, penalty, *grads)]


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("stop_gradient", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fast_path_equals_the_keras_ops_formula(rng, stop_gradient, training):
    x = tf.constant(rng.normal(1.0, 3.0, size=(4, 5, 6, 7)).astype("float32"))
    fast, ref = _nam_pair(x.shape, rng, stop_gradient=stop_gradient)
    got, want = _run(fast, x, training), _run(ref, x, training)
    names = ("output", "penalty", "d/dx", "d/dgamma (penalty included)", "d/dbeta")
    for name, a, b in zip(names, got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(
        np.asarray(fast.channel_bn.moving_variance),
        np.asarray(ref.channel_bn.moving_variance),
        rtol=1e-5,
    )


@pytest.mark.tensorflow_only
def test_fast_path_is_one_fused_kernel_and_one_gate(rng):
    x = tf.constant(rng.normal(size=(2, 4, 4, 8)).astype("float32"))
    layer = NAMAttention()
    fn = tf.function(lambda t: layer(t, training=True))
    graph_ops = [op.type for op in fn.get_concrete_function(x).graph.get_operations()]
    assert graph_ops.count("FusedBatchNormV3") == 1
    assert "Mean" not in graph_ops and "SquaredDifference" not in graph_ops


# ------------------------------------------------------------------ mixed precision


def _modulation(policy, x, gamma, **kwargs):
    """NAM's modulation `out / x - 0.5` under `policy` (x as the layer sees it)."""
    layer = NAMAttention(dtype=policy, **kwargs)
    layer.build(x.shape)
    layer.channel_bn.gamma.assign(gamma)
    seen = tf.cast(tf.cast(x, layer.compute_dtype), "float32")
    out = tf.cast(layer(x, training=True), "float32")
    return np.asarray(out / seen - 0.5).ravel()


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_the_modulation_at_initialisation(rng, policy):
    """At initialisation (C = 2048, every gamma 1: w = 1/C) the gate is
    0.5 + ~1e-4. A 16-bit gate and output round that away (bfloat16: no
    correlation with float32's at all); the float32 gate keeps it."""
    x = tf.constant(rng.normal(size=(4, 4, 4, 2048)).astype("float32"))
    gamma = np.ones(2048, "float32")
    want = _modulation("float32", x, gamma)
    got = _modulation(policy, x, gamma)
    assert np.corrcoef(got, want)[0, 1] > 0.999
    rounded = _modulation(policy, x, gamma, float32_gate=False)  # the former behaviour
    if policy == "mixed_bfloat16":  # every gate rounds to exactly 0.5
        assert not np.any(rounded)


@pytest.mark.backend_independent  # the layout and dtypes: the same on every backend
def test_float32_gate_keeps_the_residual_stream_float32_in_the_network():
    """NAMAttention after a BN (`fuse_attention=False`) returns float32 by
    default, and the addition, ReLU and pooling after it stay float32. The
    fused BatchNormNAM (the default) computes its gate in float32 from an
    unrounded BN output and returns the compute dtype unless asked."""
    unfused = build_resnet(depth=18, width=8, dtype="mixed_bfloat16", fuse_attention=False)
    for name in ("stage1_block1_nam", "stage1_block1_add", "stage4_block2_out", "avg_pool"):
        assert unfused.get_layer(name).output.dtype == "float32", name
    assert unfused.get_layer("stage2_block1_conv1").compute_dtype == "bfloat16"
    wide = build_resnet(
        depth=18, width=8, dtype="mixed_bfloat16", attention_kwargs={"float32_gate": True}
    )
    assert wide.get_layer("stage4_block2_out").output.dtype == "float32"
    for kwargs in ({}, {"float32_gate": False}):
        narrow = build_resnet(depth=18, width=8, dtype="mixed_bfloat16", attention_kwargs=kwargs)
        assert narrow.get_layer("stage1_block1_add").output.dtype == "bfloat16", kwargs
    plain = build_resnet(depth=18, width=8, dtype="mixed_bfloat16", attention=None)
    assert plain.get_layer("stage1_block1_add").output.dtype == "bfloat16"


# ------------------------------------------------------------------ float64


# Keras computes float64 in float64 on TensorFlow only: on JAX it promotes float64
# with float32 to float32 (x64 or not), so its own BatchNormalization normalises a
# float64 input in float32; the float64 numerics are then TensorFlow-only.
needs_float64 = pytest.mark.tensorflow_only


@pytest.mark.parametrize(
    "policy, gate, legacy",
    [
        ("float64", "float64", "float64"),
        ("float32", "float32", "float32"),
        ("mixed_float16", "float32", "float16"),
        ("mixed_bfloat16", "float32", "bfloat16"),
    ],
)
def test_the_gate_is_float32_only_under_a_16_bit_compute_dtype(policy, gate, legacy):
    """`float32_gate` widens a 16-bit gate to float32 and never narrows a
    float64 one; without it the gate is the compute dtype."""
    assert NAMAttention(dtype=policy).gate_dtype == gate
    assert NAMAttention(dtype=policy, float32_gate=False).gate_dtype == legacy
    x = keras.KerasTensor((2, 4, 4, 8), dtype="float32")
    assert NAMAttention(dtype=policy).compute_output_spec(x).dtype == gate


def _assign_float64(bn, rng, n):
    """Random gamma, beta and moving statistics, assigned in float64."""
    vals = [rng.normal(size=n) * 2.0, rng.normal(size=n), rng.normal(size=n)]
    vals.append(rng.uniform(0.5, 2.0, n))
    for var, val in zip([bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance], vals):
        assert var.dtype == "float64"
        var.assign(val)
    return vals


@needs_float64
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("spatial", [False, True])
def test_a_float64_layer_computes_in_float64_to_numpy_precision(rng, training, spatial):
    """Output float64 (the default `float32_gate=True` included) and equal to
    NumPy's float64 NAM to ~1e-12: no float32 step (gate, weights) anywhere."""
    x = rng.normal(1.0, 3.0, size=(4, 5, 6, 7))
    layer = NAMAttention(spatial=spatial, dtype="float64")
    layer.build(x.shape)
    c = _assign_float64(layer.channel_bn, rng, 7)
    s = _assign_float64(layer.spatial_bn, rng, 30) if spatial else [None] * 4
    out = layer(x, training=training)
    assert keras.backend.standardize_dtype(out.dtype) == "float64"
    want = np_nam(x, *c, *s, training=training)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), want, rtol=1e-12, atol=1e-12)
    weights = layer.attention_weights()["channel"]
    assert weights.dtype == np.float64
    np.testing.assert_allclose(weights, np.abs(c[0]) / np.abs(c[0]).sum(), rtol=1e-14)


def test_under_mixed_bfloat16_the_gate_stays_float32(rng):
    layer = NAMAttention(dtype="mixed_bfloat16")
    out = layer(rng.normal(size=(2, 4, 4, 8)).astype("float32"), training=True)
    assert layer.compute_dtype == "bfloat16" and layer.gate_dtype == "float32"
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


@pytest.mark.parametrize("attention", ["nam", None])
def test_a_float64_network_keeps_its_residual_stream_float64(rng, attention):
    """`build_resnet(dtype="float64")`: every layer but the input and the
    logits (float32 always, as the docstring promises) computes and returns
    float64; NAM's float32 gate no longer narrows the stream after it."""
    model = build_resnet(
        depth=18, width=4, input_shape=(16, 16, 3), dtype="float64", attention=attention
    )
    narrow = [
        layer.name
        for layer in model.layers[1:-1]
        if layer.output.dtype != "float64" or layer.compute_dtype != "float64"
    ]
    assert not narrow, f"not float64: {narrow}"
    assert (model.layers[0].name, model.layers[-1].name) == ("images", "logits")
    assert model.get_layer("logits").dtype_policy.name == "float32"
    assert model.output.dtype == "float32"
    if attention == "nam":
        for name in ("stage1_block1_nam", "stage1_block1_add", "stage4_block2_out", "avg_pool"):
            assert model.get_layer(name).output.dtype == "float64", name
    if keras.backend.backend() == "tensorflow":  # float64 numerics: see needs_float64
        logits = model(rng.uniform(0, 255, (2, 16, 16, 3)).astype("float32"), training=False)
        assert keras.backend.standardize_dtype(logits.dtype) == "float32"
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))
