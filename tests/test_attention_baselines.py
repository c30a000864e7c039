"""SE, CBAM and BAM against NumPy transcriptions of the official code's
formulas, their parameter counts by hand, and their places in the ResNet."""

import keras
import numpy as np
import pytest

from nam_keras import BAMAttention, CBAMAttention, SEAttention, build_resnet, create_attention
from nam_keras.models.resnet import forward_multiply_adds

EPS = 1e-5
BASELINE_RESNET50 = 23_758_372  # SPEC section 3
# ResNet-50: (output channels of a block, blocks) per stage
RESNET50_BLOCKS = ((256, 3), (512, 4), (1024, 6), (2048, 3))


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def relu(v):
    return np.maximum(v, 0.0)


def np_bn(x, bn, training):
    """BN over every axis but the last; batch statistics (biased) in training."""
    gamma, beta, mean, var = (keras.ops.convert_to_numpy(v).astype("float64") for v in bn.weights)
    if training:
        axes = tuple(range(x.ndim - 1))
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def np_dense(x, layer):
    kernel, bias = (keras.ops.convert_to_numpy(v).astype("float64") for v in layer.weights)
    return x @ kernel + bias


def np_conv(x, layer):
    """Stride-1 "same" convolution with dilation, by explicit shifts."""
    weights = [keras.ops.convert_to_numpy(v).astype("float64") for v in layer.weights]
    kernel = weights[0]
    kh, kw = kernel.shape[:2]
    d = layer.dilation_rate[0]
    ph, pw = d * (kh - 1) // 2, d * (kw - 1) // 2
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += padded[:, i * d : i * d + h, j * d : j * d + w, :] @ kernel[i, j]
    return out + (weights[1] if len(weights) > 1 else 0.0)


def bns_of(layer):
    """The BN sublayers of an attention layer, those in BAM's dilated list included."""
    found = [v for v in vars(layer).values() if isinstance(v, keras.layers.BatchNormalization)]
    return found + [bn for _, bn in getattr(layer, "dilated", [])]


def randomise_bns(layer, rng):
    for bn in bns_of(layer):
        n = bn.gamma.shape[0]
        for var, val in zip(
            bn.weights,
            [rng.normal(size=n), rng.normal(size=n), rng.normal(size=n), rng.uniform(0.5, 2, n)],
        ):
            var.assign(val.astype("float32"))


def np_se(x, layer):
    gate = sigmoid(np_dense(relu(np_dense(x.mean(axis=(1, 2)), layer.reduce)), layer.expand))
    return x * gate[:, None, None, :]


def np_cbam(x, layer, training):
    def mlp(p):
        return np_dense(relu(np_dense(p, layer.mlp_reduce)), layer.mlp_expand)

    x = x * sigmoid(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))[:, None, None, :]
    pooled = np.stack([x.max(axis=-1), x.mean(axis=-1)], axis=-1)  # max first, as the official
    return x * sigmoid(np_bn(np_conv(pooled, layer.spatial_conv), layer.spatial_bn, training))


def np_bam(x, layer, training):
    c = np_bn(np_dense(x.mean(axis=(1, 2)), layer.channel_reduce), layer.channel_bn, training)
    c = np_dense(relu(c), layer.channel_expand)[:, None, None, :]
    s = relu(np_bn(np_conv(x, layer.spatial_reduce), layer.spatial_reduce_bn, training))
    for conv, bn in layer.dilated:
        s = relu(np_bn(np_conv(s, conv), bn, training))
    s = np_conv(s, layer.spatial_final)
    return (1.0 + sigmoid(c * s)) * x


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["se", "cbam", "bam"])
def test_matches_numpy_transcription(rng, kind, training):
    x = rng.normal(0.5, 2.0, size=(3, 9, 10, 32)).astype("float32")
    layer = create_attention(kind, "attn")
    layer.build(x.shape)
    randomise_bns(layer, rng)
    assert len(bns_of(layer)) == {"se": 0, "cbam": 1, "bam": 4}[kind]
    got = keras.ops.convert_to_numpy(layer(x, training=training))
    x64 = x.astype("float64")
    want = {
        "se": lambda: np_se(x64, layer),
        "cbam": lambda: np_cbam(x64, layer, training),
        "bam": lambda: np_bam(x64, layer, training),
    }[kind]()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dilated_convolution_reaches_four_pixels_away():
    """BAM's 3x3 convolutions see x +- 4: a single lit pixel lights (0, +-4)."""
    layer = BAMAttention(reduction=1)
    layer.build((1, 9, 9, 1))
    conv = layer.dilated[0][0]
    conv.kernel.assign(np.ones(conv.kernel.shape, "float32"))
    conv.bias.assign(np.zeros(conv.bias.shape, "float32"))
    x = np.zeros((1, 9, 9, 1), "float32")
    x[0, 4, 4, 0] = 1.0
    lit = np.argwhere(keras.ops.convert_to_numpy(conv(x))[0, :, :, 0] != 0)
    assert sorted(map(tuple, lit)) == [(r, c) for r in (0, 4, 8) for c in (0, 4, 8)]


def se_params(c, r=16):
    h = c // r
    return c * h + h + h * c + c  # two dense layers with biases


def cbam_params(c, r=16):
    return se_params(c, r) + 7 * 7 * 2 + 4  # shared MLP, 7x7 conv 2 -> 1, BN(1) with its stats


def bam_params(c, r=16):
    h = c // r
    channel = (c * h + h) + 4 * h + (h * c + c)  # dense, BN(h) with stats, dense
    spatial = (c * h + h) + 4 * h + 2 * (9 * h * h + h + 4 * h) + (h + 1)
    return channel + spatial


@pytest.mark.backend_independent
def test_resnet50_parameter_counts_by_hand():
    se = sum(blocks * se_params(c) for c, blocks in RESNET50_BLOCKS)
    cbam = sum(blocks * cbam_params(c) for c, blocks in RESNET50_BLOCKS)
    bam = sum(bam_params(c) for c in (256, 512, 1024))  # after stages 1-3 only
    assert se == 2_530_992 and cbam == 2_532_624 and bam == 358_963
    assert build_resnet(attention="se").count_params() == BASELINE_RESNET50 + se == 26_289_364
    assert build_resnet(attention="cbam").count_params() == BASELINE_RESNET50 + cbam == 26_290_996
    assert build_resnet(attention="bam").count_params() == BASELINE_RESNET50 + bam == 24_117_335


@pytest.mark.backend_independent  # the layout and dtypes: the same on every backend
def test_bam_sits_between_stages_and_the_others_in_blocks():
    names = lambda model, cls: [x.name for x in model.layers if isinstance(x, cls)]
    bam = build_resnet(depth=18, width=16, attention="bam")
    assert names(bam, BAMAttention) == ["stage1_bam", "stage2_bam", "stage3_bam"]
    assert bam.get_layer("stage2_bam").input.shape == (None, 16, 16, 32)
    se = build_resnet(depth=18, width=16, attention="se")
    assert len(names(se, SEAttention)) == 8 and "stage4_block2_se" in names(se, SEAttention)
    cbam = build_resnet(depth=18, width=16, attention="cbam", attention_kwargs={"spatial": False})
    assert not any(x.spatial for x in cbam.layers if isinstance(x, CBAMAttention))


@pytest.mark.backend_independent
def test_multiply_adds_by_hand():
    base = forward_multiply_adds(build_resnet(attention=None))
    assert base == 1_298_014_208  # SPEC: 1.30 G
    se = sum(blocks * 2 * c * (c // 16) for c, blocks in RESNET50_BLOCKS)
    spatial = 98 * (3 * 32 * 32 + 4 * 16 * 16 + 6 * 8 * 8 + 3 * 4 * 4)
    assert forward_multiply_adds(build_resnet(attention="se")) == base + se
    assert forward_multiply_adds(build_resnet(attention="cbam")) == base + 2 * se + spatial
    assert forward_multiply_adds(build_resnet(attention="nam")) == base


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (SEAttention, {"reduction": 0}, "`reduction` must be an integer >= 1; received 0"),
        (CBAMAttention, {"kernel_size": 4}, "`kernel_size` must be an odd integer"),
        (BAMAttention, {"dilation": 0}, "`dilation` must be an integer >= 1; received 0"),
        (BAMAttention, {"momentum": 1.0}, "`momentum` must be in [0, 1)"),
    ],
)
def test_bad_arguments_are_named(cls, kwargs, message):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    assert message in str(err.value)


def test_rank_3_input_is_refused():
    with pytest.raises(ValueError, match=r"expects \(batch, height, width, channels\)"):
        SEAttention()(np.zeros((2, 3, 4), "float32"))
