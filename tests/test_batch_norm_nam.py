"""BatchNormNAM (a BN and channel NAM computed as one) against the two layers
it replaces: outputs, gradients, moving statistics, precision, the network."""

import keras
import numpy as np
import pytest
from keras import ops

import nam_keras
from nam_keras import BatchNormNAM, NAMAttention, build_resnet
from nam_keras.layers import batch_norm_nam
from nam_keras.layers.normalization import batch_normalization, fused_kernels
from nam_keras.models.resnet import weights_by_name

BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")


def _randomise(bns, rng, channels):
    """The same random gamma (both signs), beta and moving statistics in every BN of `bns`."""
    values = [
        rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels),
        rng.normal(size=channels),
        rng.normal(size=channels),
        rng.uniform(0.5, 2.0, channels),
    ]
    for bn in bns:
        for name, value in zip(BN_VARIABLES, values):
            getattr(bn, name).assign(value.astype("float32"))


def _pair(shape, rng, policy="float32", **kwargs):
    """A built BatchNormNAM and the reference (Keras' own BN, then NAMAttention on
    its keras.ops path) holding the same random variables."""
    fused = BatchNormNAM(dtype=policy, **kwargs)
    with fused_kernels(False):
        bn = batch_normalization("bn3", dtype=policy)
        nam = NAMAttention(dtype=policy, **kwargs)
    for layer in (fused, bn, nam):
        layer.build(shape)
    _randomise([fused.input_bn, bn], rng, shape[-1])
    _randomise([fused.channel_bn, nam.channel_bn], rng, shape[-1])
    return fused, (bn, nam)


def _parts(layers):
    """`(first BN, NAM layer)` of a BatchNormNAM or of a reference pair."""
    return layers if isinstance(layers, tuple) else (layers.input_bn, layers)


def _trainable(layers):
    bn3, nam = _parts(layers)
    return [bn3.gamma, bn3.beta, nam.channel_bn.gamma, nam.channel_bn.beta]


def _moving(layers):
    bn3, nam = _parts(layers)
    return [getattr(bn, n) for bn in (bn3, nam.channel_bn) for n in BN_VARIABLES[2:]]


def _apply(layers, x, training):
    if isinstance(layers, tuple):
        bn3, nam = layers
        return nam(bn3(x, training=training), training=training), nam.losses
    return layers(x, training=training), layers.losses


def _loss(out, losses):
    out = ops.cast(out, "float32")
    return ops.sum(out * ops.cos(out)) + sum(losses)


def step(layers, x, training=True, xla=False):
    """`(output, [d/dx, d/dgamma3, d/dbeta3, d/dgamma_nam, d/dbeta_nam], moving
    statistics after the call)` as float64 NumPy, for a loss with the penalty
    (on TensorFlow in a `jit_compile=True` function where `xla`)."""
    trainable, moving = _trainable(layers), _moving(layers)
    if keras.backend.backend() == "jax":
        import jax

        def f(values, x):
            mapping = list(zip(trainable + moving, values + [v.value for v in moving]))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                out, losses = _apply(layers, x, training)
                loss = _loss(out, losses)
            return loss, (out, [scope.get_current_value(v) for v in moving])

        grad = jax.grad(f, argnums=(0, 1), has_aux=True)
        (d_values, d_x), (out, new_moving) = grad([v.value for v in trainable], x)
        grads = [d_x, *d_values]
    else:
        import tensorflow as tf

        def tape_step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out, losses = _apply(layers, x, training)
                loss = _loss(out, losses)
            return out, tape.gradient(loss, [x, *trainable])

        run = tf.function(tape_step, jit_compile=True) if xla else tape_step
        out, grads = run(tf.constant(x))
        new_moving = moving
    as_np = lambda t: np.asarray(ops.convert_to_numpy(ops.cast(t, "float32")), np.float64)
    return as_np(out), [as_np(g) for g in grads], [as_np(v) for v in new_moving]


GRADIENTS = ("d/dx", "d/dgamma3", "d/dbeta3", "d/dgamma_nam", "d/dbeta_nam")


def _close(got, want, rtol, what):
    """`|got - want| <= rtol * max |want|`: a tolerance relative to the figure's scale."""
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=what)


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_a_training_step_equals_bn_then_nam(rng, stop_gradient):
    x = rng.normal(0.7, 2.0, size=(4, 5, 6, 8)).astype("float32")
    fused, reference = _pair(x.shape, rng, stop_gradient=stop_gradient)
    got, want = step(fused, x), step(reference, x)
    _close(got[0], want[0], 1e-6, "output")
    for name, a, b in zip(GRADIENTS, got[1], want[1]):
        _close(a, b, 2e-6, name)
    for name, a, b in zip(("bn3 mean", "bn3 var", "nam mean", "nam var"), got[2], want[2]):
        _close(a, b, 1e-6, f"moving {name}")


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("training", [True, False])
def test_under_xla_tensorflow_takes_the_fused_form(rng, op_types, training):
    """In a `jit_compile=True` function (Keras' "auto" on a GPU) TensorFlow takes
    the fused form, as JAX does (one variadic reduction, no BN kernel), and it
    equals the two layers; without XLA it keeps the two fused kernels."""
    x = rng.normal(0.7, 2.0, size=(4, 5, 6, 8)).astype("float32")
    fused, reference = _pair(x.shape, rng)
    got, want = step(fused, x, training, xla=True), step(reference, x, training)
    _close(got[0], want[0], 1e-6, "output")
    for name, a, b in zip(GRADIENTS, got[1], want[1]):
        _close(a, b, 2e-6, name)
    for name, a, b in zip(("bn3 mean", "bn3 var", "nam mean", "nam var"), got[2], want[2]):
        _close(a, b, 1e-6, f"moving {name}")
    traced = op_types(fused, x, training, jit_compile=True)
    assert "FusedBatchNormV3" not in traced and "FusedBatchNormV3" in op_types(fused, x, training)
    assert ("XlaVariadicReduceV2" in traced) == training
    # BNs synchronised by tf.distribute keep their own cross-replica statistics
    synced = BatchNormNAM(synchronized=True)
    synced.build(x.shape)
    assert "XlaVariadicReduceV2" not in op_types(synced, x, training, jit_compile=True)


def test_inference_folds_both_bns_into_one_affine(rng):
    x = rng.normal(0.7, 2.0, size=(3, 4, 4, 8)).astype("float32")
    fused, reference = _pair(x.shape, rng)
    got, want = step(fused, x, training=False), step(reference, x, training=False)
    _close(got[0], want[0], 1e-6, "output")
    for name, a, b in zip(GRADIENTS, got[1], want[1]):
        _close(a, b, 2e-6, name)


def test_the_folded_inference_form_is_the_two_layers_on_every_backend(rng):
    """`bn_nam_inference` against BN then NAM, also where `call` does not take it
    in inference (TensorFlow without XLA keeps the two layers there:
    `BatchNormNAM._fusable`)."""
    x = rng.normal(0.7, 2.0, size=(3, 4, 4, 8)).astype("float32")
    fused, reference = _pair(x.shape, rng)
    bn3, nam = fused.input_bn, fused.channel_bn
    w = fused._gate_weights(nam)
    got = batch_norm_nam.bn_nam_inference(
        x,
        (bn3.moving_mean, bn3.moving_variance),
        (nam.moving_mean, nam.moving_variance),
        bn3.gamma,
        bn3.beta,
        w * nam.gamma,
        w * nam.beta,
        bn3.epsilon,
        nam.epsilon,
    )
    want = step(reference, x, training=False)[0]
    _close(np.asarray(ops.convert_to_numpy(got), np.float64), want, 1e-6, "output")


def test_the_custom_gradient_equals_autodiff_of_the_closed_form(rng):
    """The hand-written backward (JAX, TensorFlow) against autodiff of the same
    closed form (the path PyTorch takes)."""
    x = rng.normal(0.3, 1.5, size=(4, 3, 3, 6)).astype("float32")
    params = [rng.uniform(0.5, 1.5, 6).astype("float32") for _ in range(4)]

    def run(custom, xla=False):
        def fn(x, *p):
            out = batch_norm_nam.bn_nam_training(x, *p, 1e-5, 1e-5, custom=custom)[0]
            return ops.sum(out * ops.sin(out))

        return _grad(fn, x, *params, xla=xla)

    for name, a, b in zip(("x", "gamma3", "beta3", "k", "d"), run(True), run(False)):
        _close(a, b, 2e-6, name)
    if keras.backend.backend() == "tensorflow":  # under XLA the sums are XLA's own reduction
        for name, a, b in zip(("x", "gamma3", "beta3", "k", "d"), run(True), run(False, True)):
            _close(a, b, 2e-6, f"{name} under XLA")


def _grad(fn, *args, xla=False):
    """Gradients of the scalar `fn(*args)` with respect to every argument
    (on TensorFlow in a `jit_compile=True` function where `xla`)."""
    if keras.backend.backend() == "jax":
        import jax

        return [np.asarray(g) for g in jax.grad(fn, argnums=tuple(range(len(args))))(*args)]
    import tensorflow as tf

    def tape_gradient(*args):
        with tf.GradientTape() as tape:
            for a in args:
                tape.watch(a)
            value = fn(*args)
        return tape.gradient(value, args)

    run = tf.function(tape_gradient, jit_compile=True) if xla else tape_gradient
    return [np.asarray(g) for g in run(*[tf.constant(a) for a in args])]


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_is_as_close_to_float32_as_the_reference(rng, policy):
    """Under a mixed policy both compute from 16-bit inputs; the fused layer
    rounds once (its output), the reference also rounds the BN output: the
    fused layer is never further from the float32 result than the reference."""
    x = rng.normal(0.7, 2.0, size=(8, 6, 6, 16)).astype("float32")
    exact = step(_pair(x.shape, np.random.default_rng(1))[1], x)
    fused, reference = _pair(x.shape, np.random.default_rng(1), policy)
    got, want = step(fused, x), step(reference, x)
    assert got[0].dtype == np.float64 and fused.compute_dtype == policy.split("_")[1]
    figures = zip(("output", *GRADIENTS), [got[0], *got[1]], [want[0], *want[1]])
    for (name, a, b), e in zip(figures, [exact[0], *exact[1]]):
        err_fused, err_ref = np.abs(a - e).max(), np.abs(b - e).max()
        assert err_fused <= 1.5 * err_ref + 1e-6 * np.abs(e).max(), (name, err_fused, err_ref)
        _close(a, e, 3e-2, name)


def test_bfloat16_output_keeps_the_modulation_as_a_dither(rng):
    """At initialisation (C = 2048, every gamma 1: w = 1/C) NAM's gate is
    0.5 + ~1e-4. `NAMAttention` without its float32 gate after a bfloat16
    BN rounds it away entirely (0.5 * y is a bfloat16 number); the fused
    layer rounds `sigmoid(z) * y` from an unrounded y, so its bfloat16 output
    carries the modulation on average: regressed on the float32 modulation,
    slope ~1 (the former's output is exactly y / 2)."""
    channels = 2048
    x = rng.normal(size=(4, 4, 4, channels)).astype("float32")
    x = ops.convert_to_numpy(ops.cast(ops.cast(x, "bfloat16"), "float32"))  # as a layer sees it
    with fused_kernels(False):
        y = ops.convert_to_numpy(keras.layers.BatchNormalization(epsilon=1e-5)(x, training=True))

    def modulation(layers):
        """`out - y / 2`: what the gate adds to a constant 0.5."""
        out = ops.convert_to_numpy(ops.cast(_apply(layers, x, True)[0], "float32"))
        return (out - 0.5 * y).ravel()

    want = modulation((batch_normalization("a"), NAMAttention()))
    fused = modulation(BatchNormNAM(dtype="mixed_bfloat16"))
    with fused_kernels(False):
        bn_bf16 = batch_normalization("b", dtype="mixed_bfloat16")
    y_bf16 = bn_bf16(x, training=True)  # what the former gate multiplies
    former = NAMAttention(dtype="mixed_bfloat16", float32_gate=False)(y_bf16, training=True)
    slope = np.polyfit(want, fused, 1)[0]
    assert 0.9 < slope < 1.1, slope
    assert np.array_equal(ops.convert_to_numpy(former), ops.convert_to_numpy(y_bf16) * 0.5)


def test_configuration_round_trip_and_refusals():
    layer = BatchNormNAM(
        sparsity=2e-4, stop_gradient=True, input_epsilon=1e-3, input_momentum=0.5, name="n"
    )
    clone = BatchNormNAM.from_config(layer.get_config())
    for key in ("sparsity", "stop_gradient", "input_epsilon", "input_momentum", "float32_gate"):
        assert getattr(clone, key) == getattr(layer, key), key
    assert (clone.input_bn.epsilon, clone.input_bn.momentum) == (1e-3, 0.5)
    assert isinstance(clone, NAMAttention) and not clone.float32_gate
    with pytest.raises(ValueError, match="channel NAM only"):
        BatchNormNAM(spatial=True)
    with pytest.raises(ValueError, match=r"`input_momentum` must be in \[0, 1\); received 1.0"):
        BatchNormNAM(input_momentum=1.0)
    with pytest.raises(ValueError, match="`input_epsilon` must be > 0; received 0"):
        BatchNormNAM(input_epsilon=0)


# ------------------------------------------------------------------ the network


def _network_pair(rng, **kwargs):
    """ResNet-18 fused and unfused with the same random weights, matched by
    `weights_by_name` (the names both layouts share)."""
    settings = dict(depth=18, width=4, input_shape=(8, 8, 3), num_classes=5, **kwargs)
    fused = build_resnet(**settings)
    unfused = build_resnet(fuse_attention=False, **settings)
    by_name = weights_by_name(unfused)
    assert sorted(by_name) == sorted(weights_by_name(fused))
    assert "stage1_block1_bn2/moving_variance" in by_name
    for name, var in weights_by_name(fused).items():
        value = rng.uniform(0.5, 1.5, var.shape) if "moving_variance" in name else None
        value = rng.normal(size=var.shape) * 0.3 if value is None else value
        var.assign(value.astype("float32"))
        by_name[name].assign(value.astype("float32"))
    return fused, unfused


def test_the_fused_network_computes_the_unfused_one(rng):
    """ResNet-18 with and without the fusion, the same weights: the same
    logits in inference and training (the gradients: the layer tests above)."""
    fused, unfused = _network_pair(rng)
    assert [type(layer).__name__ for layer in nam_keras.nam_layers(fused)] == ["BatchNormNAM"] * 8
    x = rng.uniform(0, 255, (4, 8, 8, 3)).astype("float32")
    for training in (False, True):
        a = ops.convert_to_numpy(fused(x, training=training))
        b = ops.convert_to_numpy(unfused(x, training=training))
        _close(a, b, 1e-5, f"logits, training={training}")
    assert keras.utils.get_registered_name(BatchNormNAM) == "nam_keras>BatchNormNAM"


@pytest.mark.backend_independent  # the layout: the same on every backend
def test_a_saved_fused_network_loads_and_predicts_the_same(rng, tmp_path):
    fused, _ = _network_pair(rng)
    path = tmp_path / "fused.keras"
    fused.save(path)
    loaded = keras.models.load_model(path)
    x = rng.uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x, training=False), fused(x, training=False), rtol=1e-6)
    assert type(loaded.get_layer("stage2_block1_nam")) is BatchNormNAM


@pytest.mark.backend_independent  # the layout: the same on every backend
def test_where_the_fusion_does_not_apply_the_network_keeps_two_layers():
    spatial = build_resnet(depth=18, width=4, attention_kwargs={"spatial": True})
    assert type(spatial.get_layer("stage1_block1_nam")) is NAMAttention
    assert spatial.get_layer("stage1_block1_bn2")
    se = build_resnet(depth=18, width=4, attention="se")
    assert se.get_layer("stage1_block1_bn2")


@pytest.mark.tensorflow_only
def test_a_model_of_the_unfused_layout_warm_starts_the_fused_one(rng, tmp_path):
    """`--initial-checkpoint` with a .keras file of version 0.3's layout (the BN,
    then NAMAttention) fills the fused network, which then computes the same."""
    from nam_keras.training.experiment import warm_start

    _, unfused = _network_pair(rng)
    unfused.save(tmp_path / "old.keras")
    fresh = build_resnet(depth=18, width=4, input_shape=(8, 8, 3), num_classes=5)
    warm_start(fresh, tmp_path / "old.keras")
    x = rng.uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(fresh(x, training=False), unfused(x, training=False), atol=1e-5)
