"""The CIFAR ResNet family: exact sizes, shapes, names, the attention hook, learning."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import nam_keras
from nam_keras import build_resnet, nam_layers


def _split_counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return model.count_params(), trainable


@pytest.mark.backend_independent
def test_resnet50_exact_parameter_counts():
    """SPEC section 3: built, never trained."""
    nam = build_resnet()
    assert _split_counts(nam) == (23_818_788, 23_735_460)
    assert nam.count_params() - 23_735_460 == 83_328  # the BN moving statistics
    assert len(nam_layers(nam)) == 16
    assert build_resnet(attention=None).count_params() == 23_758_372
    assert build_resnet(stem="imagenet").count_params() == 23_826_468


@pytest.mark.backend_independent
def test_readme_one_liner():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import nam_keras; m = nam_keras.build_resnet(); print(m.count_params())",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.strip().splitlines()[-1] == "23818788"


# The deeper networks' shapes are the same on every backend: JAX runs depth 18 only.
SAME_EVERYWHERE = pytest.mark.backend_independent


@pytest.mark.parametrize(
    "depth, blocks",
    [
        (18, 8),
        pytest.param(34, 16, marks=SAME_EVERYWHERE),
        pytest.param(50, 16, marks=SAME_EVERYWHERE),
        pytest.param(101, 33, marks=SAME_EVERYWHERE),
        pytest.param(152, 50, marks=SAME_EVERYWHERE),
    ],
)
def test_all_depths_build_with_right_shapes(depth, blocks):
    model = build_resnet(depth=depth, width=8, num_classes=10, input_shape=(32, 32, 3))
    assert model.output_shape == (None, 10)
    assert model.name == f"resnet{depth}_nam"
    assert len(nam_layers(model)) == blocks
    out = model(np.zeros((2, 32, 32, 3), "uint8"))
    assert out.shape == (2, 10) and out.dtype == "float32"
    # last stage is 4x down-sampled 3 times: 32 -> 4, channels 8 * 8 * expansion
    expansion = 1 if depth < 50 else 4
    assert model.get_layer("avg_pool").input.shape == (None, 4, 4, 64 * expansion)


@pytest.mark.backend_independent  # the layout and dtypes: the same on every backend
def test_layer_names_are_readable_and_unique():
    model = build_resnet(depth=50, width=8)
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    for name in (
        "stem_conv",
        "stage1_block1_proj_conv",
        "stage2_block3_nam",
        "stage4_block3_add",
        "logits",
    ):
        model.get_layer(name)
    with pytest.raises(ValueError):
        model.get_layer("stage4_block4_nam")


@pytest.mark.backend_independent  # the layout and dtypes: the same on every backend
def test_nam_is_after_last_bn_and_before_add():
    unfused = build_resnet(depth=50, width=8, fuse_attention=False)
    nam = unfused.get_layer("stage3_block2_nam")
    assert type(nam) is nam_keras.NAMAttention
    assert nam.input is unfused.get_layer("stage3_block2_bn3").output
    assert nam.output in list(unfused.get_layer("stage3_block2_add").input)
    # Fused (the default): one layer in place of the two, holding the BN as `input_bn`.
    model = build_resnet(depth=50, width=8)
    nam = model.get_layer("stage3_block2_nam")
    assert type(nam) is nam_keras.BatchNormNAM and nam.input_bn.epsilon == 1e-5
    assert nam.input is model.get_layer("stage3_block2_conv3").output
    assert nam.output in list(model.get_layer("stage3_block2_add").input)
    assert "stage3_block2_bn3" not in [layer.name for layer in model.layers]
    assert model.count_params() == unfused.count_params()


def test_bn_settings_everywhere(layers_of):
    model = build_resnet(depth=18, width=8)
    bns = layers_of(model, keras.layers.BatchNormalization)
    assert len(bns) == 1 + 2 * 8 + 3 + 8  # stem, 2 per block, 3 projections, 8 NAM
    assert {(bn.epsilon, bn.momentum) for bn in bns} == {(1e-5, 0.9)}
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert not any(c.use_bias for c in convs)


def test_stems_and_strides():
    cifar = build_resnet(depth=18, width=8)
    assert cifar.get_layer("stem_conv").kernel.shape == (3, 3, 3, 8)
    assert cifar.get_layer("stage1_block1_conv1").input.shape[1:3] == (32, 32)  # no max-pool
    imagenet = build_resnet(depth=18, width=8, stem="imagenet", input_shape=(64, 64, 3))
    assert imagenet.get_layer("stem_conv").kernel.shape == (7, 7, 3, 8)
    assert imagenet.get_layer("stage1_block1_conv1").input.shape[1:3] == (16, 16)


def test_normalisation_layer_uses_cifar_statistics():
    model = build_resnet(depth=18, width=8)
    norm = model.get_layer("normalize")
    pixel = np.array([[[[129.3105, 124.0575, 112.4295]]]], "float32")  # = 255 * mean
    np.testing.assert_allclose(np.asarray(norm(pixel)), 0.0, atol=1e-4)
    one_std = pixel + 255 * np.array(nam_keras.CIFAR100_STD, "float32")
    np.testing.assert_allclose(np.asarray(norm(one_std)), 1.0, atol=1e-4)
    assert norm.weights == []


def test_attention_kwargs_and_spatial():
    model = build_resnet(depth=18, width=8, attention_kwargs={"spatial": True, "sparsity": 0.0})
    layer = model.get_layer("stage4_block2_nam")
    assert layer.spatial and layer.sparsity == 0.0
    assert layer.spatial_bn.gamma.shape == (16,)  # 4 x 4 positions


def test_pluggable_attention_hook():
    calls = []

    def squeeze_like(channels, name):
        calls.append((channels, name))
        return keras.layers.Activation("linear", name=name)

    model = build_resnet(depth=18, width=8, attention=squeeze_like)
    assert len(calls) == 8 and calls[0] == (8, "stage1_block1_attn") and calls[-1][0] == 64
    assert not nam_layers(model)
    assert model.count_params() == build_resnet(depth=18, width=8, attention=None).count_params()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": 20}, "Unsupported depth 20"),
        ({"stem": "tiny"}, "Unknown stem 'tiny'"),
        ({"attention": "eca"}, "Unknown attention 'eca'"),
        ({"attention": 3}, "`attention` must be"),
        ({"num_classes": 0}, "num_classes"),
        ({"input_shape": (32, 32)}, "input_shape"),
        ({"input_shape": (32, 32, 1)}, "normalize_inputs"),
        ({"attention": None, "attention_kwargs": {"spatial": True}}, "attention=None"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_resnet(**kwargs)


def test_mixed_precision_model():
    model = build_resnet(depth=18, width=8, dtype="mixed_bfloat16")
    assert model.get_layer("stage2_block1_nam").compute_dtype == "bfloat16"
    out = model(np.zeros((2, 32, 32, 3), "float32"), training=True)
    assert out.dtype == "float32"
    assert all(loss.dtype == "float32" for loss in model.losses)


def test_tiny_nam_resnet_learns():
    """A few SGD steps on one tiny random batch lower the training loss."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(16, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, size=(16,))
    model = build_resnet(depth=18, width=8, num_classes=10, input_shape=(16, 16, 3))
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=16, epochs=8, verbose=0).history["loss"]
    assert history[-1] < 0.7 * history[0], history
    assert all(np.isfinite(history))


def test_sync_bn_reaches_every_batch_normalization(layers_of):
    model = build_resnet(depth=18, width=8, sync_bn=True)
    bns = layers_of(model, keras.layers.BatchNormalization)
    synced = lambda bn: bn.get_config()["synchronized"]
    assert len(bns) == 1 + 2 * 8 + 3 + 8 and all(synced(bn) for bn in bns)
    plain = layers_of(build_resnet(depth=18, width=8), keras.layers.BatchNormalization)
    assert not any(synced(bn) for bn in plain)


def test_a_keras_file_written_before_the_fused_batch_norm_still_loads():
    """tests/data holds a NAM ResNet-18 (spatial NAM too) saved by version 0.1,
    whose BNs were keras.layers.BatchNormalization, with its logits then."""
    data = os.path.join(os.path.dirname(__file__), "data")
    model = keras.models.load_model(os.path.join(data, "nam_resnet18_v0.1.keras"))
    images = np.load(os.path.join(data, "nam_resnet18_v0.1_inputs.npy"))
    want = np.load(os.path.join(data, "nam_resnet18_v0.1_logits.npy"))
    np.testing.assert_allclose(model(images, training=False), want, rtol=1e-5, atol=1e-5)
    assert len(nam_layers(model)) == 8 and nam_layers(model)[0].spatial
