"""Attention modules for the ResNet blocks, and the registry that names them.

`NAMAttention` is the Normalization-based Attention Module; the modules it is
compared with (SE, CBAM, BAM) are in `attention_baselines`. Every attention
layer is registered under a short name (`"nam"`, `"se"`, ...) with
`register_attention`; `build_resnet(attention=NAME)` looks it up there, so
no module is special.
"""

import keras
from keras import ops

from nam_keras.layers.normalization import (
    BN_EPSILON,
    BN_MOMENTUM,
    batch_normalization,
    checked_bn_settings,
)

# Guard for sum |gamma| = 0: then every |gamma_c| is 0 too and the weights are 0.
_TINY = 1e-12

#: name -> attention layer class; fill it with `register_attention`.
ATTENTIONS = {}
#: name -> the class computing a BatchNormalization and that attention as one
#: layer; fill it with `register_batch_norm_fusion`.
BATCH_NORM_FUSIONS = {}


def register_attention(name):
    """Class decorator: makes an attention layer available under `name`.

    A registered class is constructed as `cls(name=..., dtype=...,
    synchronized=..., **kwargs)` (timm's `create_attn` contract): it infers
    its number of channels from its input, and `synchronized` asks its
    BatchNormalization layers, if any, for cross-replica statistics. Its
    class attribute `placement` says where `build_resnet` puts it: `"block"`
    (every residual block, the default) or `"stage"` (between stages, BAM).

    Args:
        name: the registry key, e.g. `"nam"`.

    Returns:
        The decorator, which returns the class unchanged.
    """

    def decorator(cls):
        if name in ATTENTIONS and ATTENTIONS[name] is not cls:
            raise ValueError(f"attention {name!r} is already registered to {ATTENTIONS[name]!r}.")
        ATTENTIONS[name] = cls
        return cls

    return decorator


def register_batch_norm_fusion(name):
    """Class decorator: the registered attention `name` has a fused form with
    the BatchNormalization in front of it, this class.

    The class is constructed as `cls(name=..., dtype=..., synchronized=...,
    **kwargs)` with the attention's own arguments, takes the BN's input, and
    computes `attention(BN(x))`; its static method `accepts(kwargs)` says
    whether it fuses the attention with those arguments. `build_resnet` uses
    it for the last BN of every block where it applies.
    """

    def decorator(cls):
        if name in BATCH_NORM_FUSIONS and BATCH_NORM_FUSIONS[name] is not cls:
            raise ValueError(
                f"attention {name!r} already has a fusion with BN: {BATCH_NORM_FUSIONS[name]!r}."
            )
        BATCH_NORM_FUSIONS[name] = cls
        return cls

    return decorator


def get_attention(name):
    """The attention layer class registered as `name` (`ValueError` if none)."""
    if name not in ATTENTIONS:
        raise ValueError(f"Unknown attention {name!r}; expected one of {sorted(ATTENTIONS)}.")
    return ATTENTIONS[name]


def create_attention(kind, name, dtype=None, synchronized=False, **kwargs):
    """One attention layer of the registered `kind`, named `name`.

    Args:
        kind: a registry key, e.g. `"nam"`.
        name: the layer name.
        dtype: dtype policy; `None` uses the global policy.
        synchronized: cross-replica BN statistics (see `register_attention`).
        **kwargs: the attention class' own arguments, e.g. `spatial=True`.

    Returns:
        An unbuilt layer.
    """
    return get_attention(kind)(name=name, dtype=dtype, synchronized=synchronized, **kwargs)


@register_attention("nam")
@keras.saving.register_keras_serializable(package="nam_keras")
class NAMAttention(keras.layers.Layer):
    """Normalization-based attention (Liu et al., 2021, arXiv 2111.12419).

    Channel attention: for a feature map `x` of shape `(N, H, W, C)`,

        y = BN(x)                              # own BatchNormalization
        w_c = |gamma_c| / sum_j |gamma_j|      # from the BN scale factors
        out = sigmoid(w * y) * x

    Pixel (spatial) attention applies the same formula with the `H * W`
    pixel positions in the role of channels (a BN whose features are the
    positions, statistics over the batch and the channels), after the
    channel attention (CBAM order). It needs a static `H` and `W`.

    The layer adds the L1 sparsity penalty of the paper's eq. 4,
    `sparsity * (sum |gamma| + sum |lambda|)`, with `self.add_loss`,
    always computed in float32.

    Args:
        channel: apply channel attention. Defaults to `True`.
        spatial: apply pixel (spatial) attention. Defaults to `False`.
        sparsity: weight `p` of the L1 penalty on the NAM BN scale factors;
            `0` disables it. Defaults to `1e-4`.
        stop_gradient: if `True`, no gradient flows through the attention
            weights `w` (the official PyTorch code, which reads
            `bn.weight.data`); the BN scale still learns through `y` and the
            penalty. Defaults to `False` (the seed Paddle code).
        epsilon: BN epsilon. Defaults to `1e-5`.
        momentum: BN momentum in Keras' meaning
            (`moving = momentum * moving + (1 - momentum) * batch`).
            Defaults to `0.9`.
        synchronized: compute the BN batch statistics over all replicas of a
            `tf.distribute` strategy (TensorFlow backend). Defaults to `False`.
        float32_gate: under a mixed precision policy, compute the gate
            `sigmoid(w * y)` and the product with `x` in float32 and return
            float32. At initialisation `w = 1/C`, so the gate is 0.5 plus
            about `1e-4`: a bfloat16 gate or output rounds that modulation
            away (float16 keeps part of it), and NAM would be a constant 0.5
            until its weights become peaked. `build_resnet` then keeps the
            block's addition and ReLU in float32 too. The BN itself still
            runs in the compute dtype. Defaults to `True`.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: a feature map of shape `(batch, height, width, channels)`.
        training: Python boolean; `True` normalises with the batch statistics
            and updates the moving ones, `False` uses the moving statistics.

    Returns:
        The gated feature map, same shape: float32 when `float32_gate` (the
        default) and the compute dtype is 16-bit, else the layer's compute
        dtype (never narrower than it: float64 in a float64 layer).

    Example:

    >>> import numpy as np, keras, nam_keras
    >>> layer = nam_keras.NAMAttention()
    >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
    >>> tuple(layer(x, training=True).shape)
    (2, 8, 8, 16)
    >>> [round(float(v), 6) for v in layer.losses]   # 1e-4 * sum |gamma| = 1e-4 * 16
    [0.0016]
    """

    #: `build_resnet` puts NAM in every residual block.
    placement = "block"

    def __init__(
        self,
        channel=True,
        spatial=False,
        sparsity=1e-4,
        stop_gradient=False,
        epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM,
        synchronized=False,
        float32_gate=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not (channel or spatial):
            raise ValueError(
                "NAMAttention needs channel=True, spatial=True or both; "
                f"received channel={channel!r}, spatial={spatial!r}."
            )
        try:
            sparsity = float(sparsity)
        except (TypeError, ValueError):
            sparsity = float("nan")
        if not sparsity >= 0.0:  # also rejects NaN
            raise ValueError(
                "`sparsity` must be a number >= 0 (0 disables the penalty); "
                f"received sparsity={sparsity!r}."
            )
        self.epsilon, self.momentum = checked_bn_settings(epsilon, momentum)
        self.channel = bool(channel)
        self.spatial = bool(spatial)
        self.sparsity = sparsity
        self.stop_gradient = bool(stop_gradient)
        self.synchronized = bool(synchronized)
        self.float32_gate = bool(float32_gate)

        def bn(name, axis):
            return batch_normalization(
                name,
                axis=axis,
                synchronized=self.synchronized,
                dtype=self.dtype_policy,
                epsilon=self.epsilon,
                momentum=self.momentum,
            )

        # Channel BN normalises axis -1 of (N, H, W, C); pixel BN normalises
        # axis 1 of the (N, H*W, C) view, i.e. one feature per position.
        self.channel_bn = bn("channel_bn", -1) if self.channel else None
        self.spatial_bn = bn("spatial_bn", 1) if self.spatial else None

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                "NAMAttention expects a rank-4 input (batch, height, width, "
                f"channels); received input_shape={tuple(input_shape)}."
            )
        _, height, width, channels = input_shape
        if channels is None:
            raise ValueError(
                "NAMAttention needs a static channel dimension; received "
                f"input_shape={tuple(input_shape)}."
            )
        if self.channel:
            self.channel_bn.build(input_shape)
        if self.spatial:
            if height is None or width is None:
                raise ValueError(
                    "NAMAttention(spatial=True) needs a static height and "
                    "width (one BN feature per pixel position); received "
                    f"input_shape={tuple(input_shape)}."
                )
            self.spatial_bn.build((input_shape[0], height * width, channels))
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={1: height, 2: width, 3: channels})

    @staticmethod
    def _l1(gamma):
        return ops.sum(ops.abs(ops.cast(gamma, "float32")))

    def _weights_from(self, gamma):
        """`|gamma| / sum |gamma|` in float32 (float64 in a float64 layer),
        guarded against a zero sum."""
        dtype = "float64" if self.compute_dtype == "float64" else "float32"
        g = ops.abs(ops.cast(gamma, dtype))
        return g / ops.maximum(ops.sum(g), _TINY)

    def _gate_weights(self, bn):
        """The weights `w` of `bn`'s features as the gate uses them: detached
        from the gradient where `stop_gradient`."""
        w = self._weights_from(bn.gamma)
        return ops.stop_gradient(w) if self.stop_gradient else w

    def _add_penalty(self, penalty):
        """Adds `sparsity * penalty` (the L1 sum of the scale factors) as a layer loss."""
        if self.sparsity > 0.0:
            self.add_loss(ops.multiply(ops.cast(self.sparsity, "float32"), penalty))

    def attention_weights(self):
        """Current NAM weights as NumPy arrays, keyed `"channel"`/`"spatial"`."""
        out = {}
        if self.channel:
            out["channel"] = ops.convert_to_numpy(self._weights_from(self.channel_bn.gamma))
        if self.spatial:
            out["spatial"] = ops.convert_to_numpy(self._weights_from(self.spatial_bn.gamma))
        return out

    def _gate(self, x, bn, training):
        """`sigmoid(w * bn(x)) * x` with `w` along `bn`'s feature axis.

        `bn` returns `w * BN(x)` itself (`scale_factor`): on TensorFlow its
        fused kernel folds `w` into gamma and beta, so the BN, the weighting
        and its gradient cost one kernel each way; elsewhere it is the plain
        formula `w * bn(x)`.
        """
        w = self._gate_weights(bn)
        rank = len(x.shape)
        if bn.axis % rank != rank - 1:
            w = ops.expand_dims(w, -1)  # pixel BN: (H*W, 1) against (N, H*W, C)
        z = bn(x, training=training, scale_factor=w)
        dtype = self.gate_compute_dtype
        return ops.cast(ops.sigmoid(ops.cast(z, dtype)) * ops.cast(x, dtype), self.gate_dtype)

    @property
    def gate_compute_dtype(self):
        """The dtype the gate and the product are computed in: `gate_dtype`
        (a subclass may compute wider than it returns)."""
        return self.gate_dtype

    @property
    def gate_dtype(self):
        """The dtype of the gate, the product and the output: float32 where
        `float32_gate` and the compute dtype is 16-bit (`float16`,
        `bfloat16`), else the compute dtype. Never narrower than the compute
        dtype: a float64 layer gates in float64."""
        if self.float32_gate and self.compute_dtype in ("float16", "bfloat16"):
            return "float32"
        return self.compute_dtype

    def call(self, inputs, training=None):
        x = ops.cast(inputs, self.compute_dtype)
        penalty = None
        if self.channel:
            x = self._gate(x, self.channel_bn, training)
            penalty = self._l1(self.channel_bn.gamma)
        if self.spatial:
            _n, h, w, c = ops.shape(x)
            flat = ops.reshape(x, (-1, h * w, c))
            x = ops.reshape(self._gate(flat, self.spatial_bn, training), (-1, h, w, c))
            l1 = self._l1(self.spatial_bn.gamma)
            penalty = l1 if penalty is None else penalty + l1
        self._add_penalty(penalty)
        return x

    def multiply_adds(self, input_shape):
        """0: NAM has no convolution or dense layer (its BN and gate are
        element-wise, which `forward_multiply_adds` does not count)."""
        del input_shape
        return 0

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(inputs.shape, dtype=self.gate_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "channel": self.channel,
                "spatial": self.spatial,
                "sparsity": self.sparsity,
                "stop_gradient": self.stop_gradient,
                "epsilon": self.epsilon,
                "momentum": self.momentum,
                "synchronized": self.synchronized,
                "float32_gate": self.float32_gate,
            }
        )
        return config
