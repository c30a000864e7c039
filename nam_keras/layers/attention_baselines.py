"""The attention modules NAM is compared with: SE, CBAM and BAM.

Each is a registered attention layer (`build_resnet(attention="se")`,
`train.py --attention se`), written in `keras.ops` for channels-last
feature maps `(N, H, W, C)`, and computes what the official NAM repository's
PyTorch code computes (Christian-lyc/NAM, `MODELS/cbam.py` and
`MODELS/bam.py`; SE as Hu et al. define it):

    se:   g = sigmoid(W2 relu(W1 avg(x) + b1) + b2);              out = g * x
    cbam: g = sigmoid(mlp(avg(x)) + mlp(max(x)));                 x' = g * x
          s = sigmoid(BN(conv7x7([max_c(x'), mean_c(x')])));      out = s * x'
    bam:  c = W2 relu(BN(W1 avg(x) + b1)) + b2                    (N, 1, 1, C)
          s = conv1x1(relu(BN(dil3x3(relu(BN(dil3x3(relu(BN(conv1x1(x))))))))))
                                                                  (N, H, W, 1)
          out = (1 + sigmoid(c * s)) * x

`mlp` is one MLP shared by both poolings; every reduction is `C // 16`
(at least 1). SE and CBAM sit where NAM sits, in every residual block;
BAM sits between stages (its `placement` is `"stage"`), after stages 1 to 3.
"""

import keras
from keras import ops

from nam_keras.layers.attention import register_attention
from nam_keras.layers.initializers import CONV_INIT, DENSE_INIT
from nam_keras.layers.normalization import BN_EPSILON, BN_MOMENTUM, batch_normalization

#: CBAM's spatial BN: PyTorch momentum 0.01 in the official code, 0.99 in Keras' meaning.
CBAM_BN_MOMENTUM = 0.99


class GatedAttention(keras.layers.Layer):
    """What SE, CBAM and BAM share: a reduction ratio, BN settings and helpers
    that create their sublayers with the layer's dtype policy.

    Args:
        reduction: hidden width of the gates' bottleneck is `C // reduction`
            (at least 1). Defaults to 16.
        synchronized: cross-replica statistics for the BNs of the module.
        epsilon: BN epsilon. Defaults to `1e-5`.
        momentum: BN momentum in Keras' meaning. Defaults to `0.9`.
        **kwargs: base layer arguments (`name`, `dtype`, ...).
    """

    #: where `build_resnet` puts the module: in every `"block"`, or between `"stage"`s.
    placement = "block"

    def __init__(
        self, reduction=16, synchronized=False, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, **kwargs
    ):
        super().__init__(**kwargs)
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"`reduction` must be an integer >= 1; received {reduction!r}.")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1); received {momentum!r}.")
        if not float(epsilon) > 0.0:
            raise ValueError(f"`epsilon` must be > 0; received {epsilon!r}.")
        self.reduction = reduction
        self.synchronized = bool(synchronized)
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)

    def hidden_units(self, channels):
        """The bottleneck width for `channels` input channels."""
        return max(channels // self.reduction, 1)

    def _check_input(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(
                f"{type(self).__name__} expects (batch, height, width, channels) with a known "
                f"number of channels; received input_shape={tuple(input_shape)}."
            )
        return input_shape[-1]

    def _dense(self, units, name):
        return keras.layers.Dense(
            units,
            kernel_initializer=DENSE_INIT,
            bias_initializer=DENSE_INIT,
            name=name,
            dtype=self.dtype_policy,
        )

    def _conv(self, filters, kernel_size, name, dilation=1, use_bias=True):
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            padding="same",  # odd kernels at stride 1: symmetric, as PyTorch pads
            dilation_rate=dilation,
            use_bias=use_bias,
            kernel_initializer=CONV_INIT,
            name=name,
            dtype=self.dtype_policy,
        )

    def _bn(self, name, momentum=None):
        return batch_normalization(
            name,
            synchronized=self.synchronized,
            dtype=self.dtype_policy,
            epsilon=self.epsilon,
            momentum=self.momentum if momentum is None else momentum,
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "reduction": self.reduction,
                "synchronized": self.synchronized,
                "epsilon": self.epsilon,
                "momentum": self.momentum,
            }
        )
        return config


def _global_pool(x, kind):
    """`(N, H, W, C)` -> `(N, C)`: mean or max over the positions."""
    return ops.mean(x, axis=(1, 2)) if kind == "avg" else ops.max(x, axis=(1, 2))


@register_attention("se")
@keras.saving.register_keras_serializable(package="nam_keras")
class SEAttention(GatedAttention):
    """Squeeze-and-excitation (Hu et al., 2018): a channel gate from the
    globally averaged features through a bottleneck MLP.

    `out = sigmoid(expand(relu(reduce(avg(x))))) * x`, both dense layers with
    bias. Parameters for `C` channels and `h = C // 16`: `2 C h + h + C`.

    Args: see `GatedAttention` (SE has no BN; `synchronized`, `epsilon` and
        `momentum` are accepted for the registry's contract).
    """

    def build(self, input_shape):
        channels = self._check_input(input_shape)
        self.reduce = self._dense(self.hidden_units(channels), "reduce")
        self.expand = self._dense(channels, "expand")
        self.reduce.build((None, channels))
        self.expand.build((None, self.hidden_units(channels)))

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        squeezed = _global_pool(x, "avg")
        gate = ops.sigmoid(self.expand(ops.relu(self.reduce(squeezed))))
        return x * gate[:, None, None, :]

    def multiply_adds(self, input_shape):
        """Multiply-adds per image of the dense layers."""
        channels = input_shape[-1]
        return 2 * channels * self.hidden_units(channels)


@register_attention("cbam")
@keras.saving.register_keras_serializable(package="nam_keras")
class CBAMAttention(GatedAttention):
    """CBAM (Woo et al., 2018) as the official NAM repository implements it.

    Channel gate: `sigmoid(mlp(avg(x)) + mlp(max(x)))` with one MLP
    (`C -> C // 16 -> C`, ReLU, biases) shared by both poolings. Spatial gate
    on the channel-gated map `x'`: the per-pixel maximum and mean over the
    channels (in that order) -> 7x7 convolution (2 -> 1, no bias) -> BN ->
    sigmoid. Parameters: `2 C h + h + C` (MLP) `+ 98` (conv) `+ 4` (BN: scale,
    offset and the two moving statistics).

    Args:
        spatial: apply the spatial gate (`no_spatial=False` in the official
            code). Defaults to `True`.
        kernel_size: the spatial convolution's size. Defaults to 7.
        spatial_momentum: momentum of the spatial gate's BN (Keras' meaning);
            the official code uses PyTorch's 0.01, i.e. 0.99 here.
        **kwargs: see `GatedAttention`.
    """

    def __init__(self, spatial=True, kernel_size=7, spatial_momentum=CBAM_BN_MOMENTUM, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"`kernel_size` must be an odd integer >= 1; received {kernel_size!r}."
            )
        self.spatial = bool(spatial)
        self.kernel_size = kernel_size
        self.spatial_momentum = float(spatial_momentum)

    def build(self, input_shape):
        channels = self._check_input(input_shape)
        hidden = self.hidden_units(channels)
        self.mlp_reduce = self._dense(hidden, "mlp_reduce")
        self.mlp_expand = self._dense(channels, "mlp_expand")
        self.mlp_reduce.build((None, channels))
        self.mlp_expand.build((None, hidden))
        if self.spatial:
            self.spatial_conv = self._conv(1, self.kernel_size, "spatial_conv", use_bias=False)
            self.spatial_bn = self._bn("spatial_bn", momentum=self.spatial_momentum)
            self.spatial_conv.build((*input_shape[:3], 2))
            self.spatial_bn.build((*input_shape[:3], 1))

    def _mlp(self, pooled):
        return self.mlp_expand(ops.relu(self.mlp_reduce(pooled)))

    def call(self, inputs, training=None):
        x = ops.cast(inputs, self.compute_dtype)
        logits = self._mlp(_global_pool(x, "avg")) + self._mlp(_global_pool(x, "max"))
        x = x * ops.sigmoid(logits)[:, None, None, :]
        if not self.spatial:
            return x
        pooled = ops.concatenate(
            [ops.max(x, axis=-1, keepdims=True), ops.mean(x, axis=-1, keepdims=True)], axis=-1
        )
        scale = self.spatial_bn(self.spatial_conv(pooled), training=training)
        return x * ops.sigmoid(scale)

    def multiply_adds(self, input_shape):
        """Multiply-adds per image of the MLP (twice) and the spatial convolution."""
        _, height, width, channels = input_shape
        macs = 2 * 2 * channels * self.hidden_units(channels)
        if self.spatial:
            macs += height * width * self.kernel_size**2 * 2
        return macs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "spatial": self.spatial,
                "kernel_size": self.kernel_size,
                "spatial_momentum": self.spatial_momentum,
            }
        )
        return config


@register_attention("bam")
@keras.saving.register_keras_serializable(package="nam_keras")
class BAMAttention(GatedAttention):
    """BAM (Park et al., 2018) as the official NAM repository implements it.

    `out = (1 + sigmoid(c * s)) * x` with a channel branch `c` (global average
    -> dense `C -> h` -> BN -> ReLU -> dense `h -> C`) and a spatial branch
    `s` (1x1 conv `C -> h` -> BN -> ReLU, then `dilated_convs` times a 3x3
    conv with dilation 4 -> BN -> ReLU, then a 1x1 conv `h -> 1`); every
    dense and conv layer has a bias, `h = C // 16`. It sits between stages
    (`placement = "stage"`): `build_resnet` applies it after stages 1, 2, 3.

    Args:
        dilation: dilation of the spatial branch's 3x3 convolutions. Defaults to 4.
        dilated_convs: how many of them. Defaults to 2.
        **kwargs: see `GatedAttention`.
    """

    placement = "stage"

    def __init__(self, dilation=4, dilated_convs=2, **kwargs):
        super().__init__(**kwargs)
        for key, value, low in (("dilation", dilation, 1), ("dilated_convs", dilated_convs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{key}` must be an integer >= {low}; received {value!r}.")
        self.dilation = dilation
        self.dilated_convs = dilated_convs

    def build(self, input_shape):
        channels = self._check_input(input_shape)
        hidden = self.hidden_units(channels)
        spatial = (*input_shape[:3], hidden)
        self.channel_reduce = self._dense(hidden, "channel_reduce")
        self.channel_bn = self._bn("channel_bn")
        self.channel_expand = self._dense(channels, "channel_expand")
        self.channel_reduce.build((None, channels))
        self.channel_bn.build((None, hidden))
        self.channel_expand.build((None, hidden))
        self.spatial_reduce = self._conv(hidden, 1, "spatial_reduce")
        self.spatial_reduce_bn = self._bn("spatial_reduce_bn")
        self.spatial_reduce.build(input_shape)
        self.spatial_reduce_bn.build(spatial)
        self.dilated = []
        for i in range(self.dilated_convs):
            conv = self._conv(hidden, 3, f"spatial_dilated{i}", dilation=self.dilation)
            bn = self._bn(f"spatial_dilated{i}_bn")
            conv.build(spatial)
            bn.build(spatial)
            self.dilated.append((conv, bn))
        self.spatial_final = self._conv(1, 1, "spatial_final")
        self.spatial_final.build(spatial)

    def _channel_branch(self, x, training):
        y = self.channel_bn(self.channel_reduce(_global_pool(x, "avg")), training=training)
        return self.channel_expand(ops.relu(y))[:, None, None, :]

    def _spatial_branch(self, x, training):
        y = ops.relu(self.spatial_reduce_bn(self.spatial_reduce(x), training=training))
        for conv, bn in self.dilated:
            y = ops.relu(bn(conv(y), training=training))
        return self.spatial_final(y)

    def call(self, inputs, training=None):
        x = ops.cast(inputs, self.compute_dtype)
        attention = self._channel_branch(x, training) * self._spatial_branch(x, training)
        return (1.0 + ops.sigmoid(attention)) * x

    def multiply_adds(self, input_shape):
        """Multiply-adds per image of the dense and convolution layers."""
        _, height, width, channels = input_shape
        hidden = self.hidden_units(channels)
        per_pixel = channels * hidden + self.dilated_convs * 9 * hidden * hidden + hidden
        return 2 * channels * hidden + height * width * per_pixel

    def get_config(self):
        config = super().get_config()
        config.update({"dilation": self.dilation, "dilated_convs": self.dilated_convs})
        return config
