"""The network's BatchNormalization: the factory, and the fused kernel against Keras' own."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nam_keras import build_resnet
from nam_keras.layers.normalization import FusedBatchNormalization, batch_normalization


def test_reference_settings_and_options():
    bn = batch_normalization("bn")
    assert isinstance(bn, FusedBatchNormalization)
    assert isinstance(bn, keras.layers.BatchNormalization)
    assert (bn.epsilon, bn.momentum, bn.axis, bn.synchronized) == (1e-5, 0.9, -1, False)
    bn = batch_normalization(
        "b2", axis=1, synchronized=True, dtype="mixed_bfloat16", gamma_initializer="zeros"
    )
    assert (bn.name, bn.axis, bn.compute_dtype) == ("b2", 1, "bfloat16")
    assert bn.get_config()["synchronized"] is True
    # a tf.distribute notion: Keras refuses it on other backends, where the layer
    # normalises with the statistics of the batch it sees
    assert bn.synchronized is (keras.backend.backend() == "tensorflow")
    bn.build((2, 3, 4))
    np.testing.assert_array_equal(np.asarray(bn.gamma), np.zeros(3))


def test_every_bn_of_a_network_normalises_with_epsilon_1e5_and_momentum_0_9(rng, layers_of):
    """Behaviour, not attributes: for every BN of a NAM ResNet (the NAM ones
    included), the moving statistics move by 10% of the way to the batch's
    (momentum 0.9; Keras' default 0.99 moves them by 1%), and the inference
    output divides by sqrt(var + 1e-5), with variances small enough that
    Keras' default 1e-3 would give another output."""
    model = build_resnet(depth=18, width=4, input_shape=(8, 8, 3))
    bns = layers_of(model, keras.layers.BatchNormalization)
    assert len(bns) == 1 + 2 * 8 + 3 + 8  # stem, 2 per block, 3 shortcuts, 8 NAM
    for bn in bns:
        c = bn.gamma.shape[0]
        x = rng.normal(0.3, 0.01, size=(2, 3, 3, c)).astype("float32")
        gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
        mean0, var0 = rng.normal(0.3, 0.01, c), rng.uniform(1e-5, 4e-5, c)
        for var, value in zip(
            (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance), (gamma, beta, mean0, var0)
        ):
            var.assign(value.astype("float32"))
        got = keras.ops.convert_to_numpy(bn(x, training=False)).astype("float64")
        want = (x - mean0) / np.sqrt(var0 + 1e-5) * gamma + beta
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3, err_msg=bn.name)
        bn(x, training=True)
        x64 = x.astype("float64")
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(bn.moving_mean),
            0.9 * mean0 + 0.1 * x64.mean((0, 1, 2)),
            rtol=1e-5,
            err_msg=bn.name,
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(bn.moving_variance),
            0.9 * var0 + 0.1 * x64.var((0, 1, 2)),
            rtol=1e-3,
            err_msg=bn.name,
        )


def test_training_output_by_hand(rng):
    x = rng.normal(size=(16, 5)).astype("float32")
    y = batch_normalization("bn")(x, training=True)
    want = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the fused kernel

POLICIES = {"float32": 1e-5, "mixed_float16": 2e-3, "mixed_bfloat16": 2e-2}


def _pair(shape, policy, rng, momentum=0.9):
    """A fused BN and Keras' own, same weights, same (non-trivial) state."""
    fused = FusedBatchNormalization(epsilon=1e-5, momentum=momentum, dtype=policy)
    plain = keras.layers.BatchNormalization(epsilon=1e-5, momentum=momentum, dtype=policy)
    for layer in (fused, plain):
        layer.build(shape)
    c = shape[-1]
    values = [
        rng.uniform(0.5, 2.0, c),
        rng.normal(size=c),
        rng.normal(size=c),
        rng.uniform(0.5, 2.0, c),
    ]
    for layer in (fused, plain):
        for var, value in zip(
            (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance), values
        ):
            var.assign(value.astype("float32"))
    return fused, plain


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("training", [True, False])
def test_fused_equals_keras_batch_normalization(rng, gradients, policy, training):
    """TensorFlow's fused kernel, or JAX's hand-written gradient, against Keras' BN."""
    x = (3.0 + 2.0 * rng.normal(size=(4, 5, 6, 8))).astype("float32")
    fused, plain = _pair(x.shape, policy, rng)
    tol = POLICIES[policy]
    got, want = (
        gradients(lambda t, bn=bn: bn(t, training=training), x, [bn.gamma, bn.beta])
        for bn in (fused, plain)
    )
    assert got[0].dtype == want[0].dtype
    for name, a, b in zip(("output", "d/dx", "d/dgamma", "d/dbeta"), got, want):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=name)
    # moving statistics: the same update, biased variance, Keras' momentum
    for bn in (fused, plain):
        bn(x, training=training)
    np.testing.assert_allclose(
        np.asarray(fused.moving_mean), np.asarray(plain.moving_mean), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(fused.moving_variance), np.asarray(plain.moving_variance), rtol=1e-5
    )


@pytest.mark.tensorflow_only
def test_moving_variance_is_the_biased_batch_variance(rng):
    x = rng.normal(size=(2, 3, 3, 4)).astype("float32")
    bn = FusedBatchNormalization(epsilon=1e-5, momentum=0.0)  # moving = this batch
    bn(x, training=True)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), x.var((0, 1, 2)), rtol=1e-5)


@pytest.mark.tensorflow_only
def test_the_kernel_is_used_only_where_it_applies(rng, op_types):
    x = tf.constant(rng.normal(size=(2, 4, 4, 8)).astype("float32"))
    for training in (True, False):
        ops_used = op_types(FusedBatchNormalization(), x, training)
        assert "FusedBatchNormV3" in ops_used and "Mean" not in ops_used
    assert "FusedBatchNormV3" not in op_types(FusedBatchNormalization(fused=False), x, True)
    assert "FusedBatchNormV3" not in op_types(FusedBatchNormalization(synchronized=True), x, True)
    flat = tf.reshape(x, (2, 16, 8))
    assert "FusedBatchNormV3" not in op_types(FusedBatchNormalization(axis=1), flat, True)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("training", [True, False])
def test_scale_factor_is_folded_into_gamma_and_beta(rng, training):
    x = tf.constant(rng.normal(size=(4, 3, 3, 6)).astype("float32"))
    factor = tf.Variable(rng.uniform(0.1, 1.0, 6).astype("float32"))
    results = []
    for fused in (None, False):
        bn = FusedBatchNormalization(fused=fused)
        bn.build(x.shape)
        bn.gamma.assign(np.linspace(0.5, 2.0, 6).astype("float32"))
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = bn(x, training=training, scale_factor=factor)
            loss = tf.reduce_sum(out * tf.cos(out))
        results.append([out, *tape.gradient(loss, [x, bn.gamma, bn.beta, factor])])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_under_xla_tensorflow_takes_the_hand_written_gradient(rng, gradients, op_types, policy):
    """In a `jit_compile=True` function (Keras' "auto" on a GPU) a training BN is
    the hand-written gradient with one variadic reduction each way, not the
    kernel: equal to Keras' BN, moving statistics included; without XLA, the kernel."""
    x = (3.0 + 2.0 * rng.normal(size=(4, 5, 6, 8))).astype("float32")
    fused, plain = _pair(x.shape, policy, rng)
    got = gradients(lambda t: fused(t, training=True), x, [fused.gamma, fused.beta], xla=True)
    want = gradients(lambda t: plain(t, training=True), x, [plain.gamma, plain.beta])
    tol = POLICIES[policy]
    for name, a, b in zip(("output", "d/dx", "d/dgamma", "d/dbeta"), got, want):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=name)
    tf.function(lambda t: fused(t, training=True), jit_compile=True)(x)
    plain(x, training=True)
    for a, b in (
        (fused.moving_mean, plain.moving_mean),
        (fused.moving_variance, plain.moving_variance),
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    traced = op_types(fused, x, True, jit_compile=True)
    assert "XlaVariadicReduceV2" in traced and "FusedBatchNormV3" not in traced
    assert "FusedBatchNormV3" in op_types(fused, tf.constant(x), True)
    synced = FusedBatchNormalization(synchronized=True)  # tf.distribute's statistics: Keras'
    synced.build(x.shape)
    assert "XlaVariadicReduceV2" not in op_types(synced, x, True, jit_compile=True)


def test_config_round_trip_keeps_fused():
    bn = FusedBatchNormalization(fused=False, name="bn", epsilon=1e-5)
    clone = FusedBatchNormalization.from_config(bn.get_config())
    assert clone.fused is False and clone.epsilon == 1e-5
    assert set(keras.layers.BatchNormalization().get_config()) | {"fused"} == set(bn.get_config())


def test_batch_statistics_keep_their_precision_for_a_large_mean(rng, gradients):
    """Mean 50, spread 0.05 (mean / std = 1000): the one-pass statistics of the
    fast paths (JAX's hand-written gradient, BatchNormNAM) against NumPy's."""
    from nam_keras.layers.normalization import moments

    x = (50.0 + 0.05 * rng.normal(size=(8, 6, 6, 4))).astype("float32")
    mean, var = (keras.ops.convert_to_numpy(t) for t in moments(keras.ops.convert_to_tensor(x)))
    x64 = x.astype("float64")
    np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=1e-3)
    bn = FusedBatchNormalization(epsilon=1e-5, momentum=0.0)
    bn.build(x.shape)
    out = gradients(lambda t: bn(t, training=True), x, [bn.gamma, bn.beta])[0]
    want = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(out, want, atol=2e-3)
