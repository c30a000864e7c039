"""CIFAR-style ResNets (18/34/50/101/152) with a pluggable attention hook."""

import keras

from nam_keras.layers import BN_EPSILON, BN_MOMENTUM, NAMAttention

#: CIFAR-100 channel statistics on the [0, 1] scale (SPEC section 4).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.1942, 0.1918, 0.1958)

#: depth -> (block kind, blocks per stage)
RESNET_CONFIGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_STAGE_WIDTHS = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
_EXPANSION = {"basic": 1, "bottleneck": 4}
_STEMS = ("cifar", "imagenet")

# He initialisation with fan-out, as torchvision initialises its ResNets.
_CONV_INIT = {"class_name": "VarianceScaling",
              "config": {"scale": 2.0, "mode": "fan_out", "distribution": "untruncated_normal"}}
# torchvision's default nn.Linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_DENSE_INIT = {"class_name": "VarianceScaling",
               "config": {"scale": 1.0 / 3.0, "mode": "fan_in", "distribution": "uniform"}}


def nam_attention(channels, name, dtype=None, **kwargs):
    """Attention factory for `build_resnet`: one `NAMAttention` per block."""
    del channels  # NAM infers its width from its input
    return NAMAttention(name=name, dtype=dtype, **kwargs)


_ATTENTIONS = {"nam": nam_attention}


class _Ops:
    """Creates the layers of one network with shared settings and names."""

    def __init__(self, dtype, sync_bn):
        self.dtype = dtype
        self.sync_bn = sync_bn

    def conv(self, x, filters, kernel, stride, name):
        if stride > 1 and kernel > 1:
            # Symmetric padding as in PyTorch/Paddle (Keras' "same" pads only
            # at the end for even sizes with stride 2).
            x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad", dtype=self.dtype)(x)
            padding = "valid"
        else:
            padding = "same"
        return keras.layers.Conv2D(
            filters, kernel, strides=stride, padding=padding, use_bias=False,
            kernel_initializer=_CONV_INIT, name=name, dtype=self.dtype,
        )(x)

    def bn(self, x, name, gamma_initializer="ones"):
        return keras.layers.BatchNormalization(
            epsilon=BN_EPSILON, momentum=BN_MOMENTUM, gamma_initializer=gamma_initializer,
            synchronized=self.sync_bn, name=name, dtype=self.dtype,
        )(x)

    def relu(self, x, name):
        return keras.layers.ReLU(name=name, dtype=self.dtype)(x)


def _residual_block(o, x, kind, width, stride, attention, name):
    """One basic or bottleneck block; `attention` is applied to the residual
    branch after its last BN, before the addition with the shortcut."""
    out_channels = width * _EXPANSION[kind]
    if kind == "basic":
        y = o.relu(o.bn(o.conv(x, width, 3, stride, f"{name}_conv1"), f"{name}_bn1"), f"{name}_relu1")
        y = o.bn(o.conv(y, width, 3, 1, f"{name}_conv2"), f"{name}_bn2")
    else:
        y = o.relu(o.bn(o.conv(x, width, 1, 1, f"{name}_conv1"), f"{name}_bn1"), f"{name}_relu1")
        y = o.relu(o.bn(o.conv(y, width, 3, stride, f"{name}_conv2"), f"{name}_bn2"), f"{name}_relu2")
        y = o.bn(o.conv(y, out_channels, 1, 1, f"{name}_conv3"), f"{name}_bn3")
    if attention is not None:
        y = attention(out_channels, f"{name}_{attention.tag}")(y)
    shortcut = x
    if stride != 1 or x.shape[-1] != out_channels:
        shortcut = o.conv(x, out_channels, 1, stride, f"{name}_proj_conv")
        shortcut = o.bn(shortcut, f"{name}_proj_bn")
    y = keras.layers.Add(name=f"{name}_add", dtype=o.dtype)([y, shortcut])
    return o.relu(y, f"{name}_out")


def _resolve_attention(attention, attention_kwargs, dtype, sync_bn):
    """Turns the `attention` argument into a factory `(channels, name) -> layer`."""
    kwargs = dict(attention_kwargs or {})
    if attention is None:
        if kwargs:
            raise ValueError(f"attention_kwargs={kwargs!r} given with attention=None.")
        return None
    if isinstance(attention, str):
        if attention not in _ATTENTIONS:
            raise ValueError(
                f"Unknown attention {attention!r}; expected one of "
                f"{sorted(_ATTENTIONS)}, None, or a callable (channels, name) -> layer."
            )
        base, tag = _ATTENTIONS[attention], attention
    elif callable(attention):
        base, tag = attention, "attn"
    else:
        raise ValueError(
            "`attention` must be 'nam', None, or a callable (channels, name) -> "
            f"layer; received {attention!r}."
        )

    def factory(channels, name):
        if base is nam_attention:
            return base(channels, name, dtype=dtype, **{"synchronized": sync_bn, **kwargs})
        return base(channels, name, **kwargs)

    factory.tag = tag
    return factory


def build_resnet(
    depth=50,
    num_classes=100,
    attention="nam",
    input_shape=(32, 32, 3),
    stem="cifar",
    attention_kwargs=None,
    normalize_inputs=True,
    width=64,
    sync_bn=False,
    dtype=None,
    name=None,
):
    """Builds a ResNet for CIFAR as a functional `keras.Model`.

    The model takes raw pixels in [0, 255] (any numeric dtype; uint8 from the
    data pipeline or a serving request) and returns class logits in float32.
    With `normalize_inputs=True` (the default) its first layer subtracts the
    CIFAR-100 mean and divides by the std; that layer holds no weights.

    Args:
        depth: 18, 34 (basic blocks), 50, 101 or 152 (bottleneck blocks).
        num_classes: size of the classifier. Defaults to 100.
        attention: `"nam"` (default), `None` for the plain ResNet, or a callable
            `(channels, name) -> keras.layers.Layer` applied in every block
            after the last BN of the residual branch (timm's `attn_layer` hook).
        input_shape: `(height, width, channels)`; defaults to `(32, 32, 3)`.
        stem: `"cifar"` (3x3/1 conv, no pooling; default) or `"imagenet"`
            (7x7/2 conv and 3x3/2 max-pool).
        attention_kwargs: extra arguments for the attention layers, e.g.
            `{"spatial": True}` or `{"sparsity": 0.0}` for NAM.
        normalize_inputs: put the fixed CIFAR-100 mean/std normalisation in
            the model. Defaults to `True`.
        width: channels of the stem and of the first stage (64 in the paper);
            a smaller value gives a narrow network for tests and smoke runs.
        sync_bn: synchronise the BN batch statistics of every BatchNormalization
            (NAM's included) across the replicas of a `tf.distribute` strategy,
            so that several devices train like one device on the global batch.
        dtype: dtype policy for every layer (e.g. `"mixed_bfloat16"`);
            `None` uses the global policy. The logits are always float32.
        name: model name; defaults to e.g. `"resnet50_nam"`.

    Example:

    >>> import nam_keras
    >>> model = nam_keras.build_resnet(depth=50, num_classes=100)
    >>> model.count_params()
    23818788
    >>> tiny = nam_keras.build_resnet(depth=18, width=8, input_shape=(16, 16, 3))
    >>> tiny.output_shape
    (None, 100)
    """
    if depth not in RESNET_CONFIGS:
        raise ValueError(f"Unsupported depth {depth!r}; expected one of {sorted(RESNET_CONFIGS)}.")
    if stem not in _STEMS:
        raise ValueError(f"Unknown stem {stem!r}; expected one of {list(_STEMS)}.")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive integer; received {num_classes!r}.")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"`width` must be a positive integer; received {width!r}.")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] is None:
        raise ValueError(
            "`input_shape` must be (height, width, channels) with a known number "
            f"of channels; received {input_shape!r}."
        )
    if normalize_inputs and input_shape[-1] != 3:
        raise ValueError(
            "normalize_inputs=True uses the 3-channel CIFAR-100 statistics; received "
            f"input_shape={input_shape!r} (pass normalize_inputs=False)."
        )
    kind, blocks = RESNET_CONFIGS[depth]
    attn = _resolve_attention(attention, attention_kwargs, dtype, sync_bn)
    if name is None:
        name = f"resnet{depth}_{'plain' if attention is None else attn.tag}"

    o = _Ops(dtype, sync_bn)
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    if normalize_inputs:
        x = keras.layers.Normalization(
            mean=[255.0 * m for m in CIFAR100_MEAN],
            variance=[(255.0 * s) ** 2 for s in CIFAR100_STD],
            name="normalize", dtype=dtype,
        )(x)
    if stem == "cifar":
        x = o.conv(x, width, 3, 1, "stem_conv")
    else:
        x = o.conv(x, width, 7, 2, "stem_conv")
    x = o.relu(o.bn(x, "stem_bn"), "stem_relu")
    if stem == "imagenet":
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad", dtype=dtype)(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool", dtype=dtype)(x)

    for s, (n_blocks, stage_width, stride) in enumerate(
        zip(blocks, _STAGE_WIDTHS, _STAGE_STRIDES), start=1
    ):
        stage_width = stage_width * width // 64
        for b in range(1, n_blocks + 1):
            x = _residual_block(
                o, x, kind, stage_width, stride if b == 1 else 1, attn, f"stage{s}_block{b}"
            )
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool", dtype=dtype)(x)
    outputs = keras.layers.Dense(
        num_classes, kernel_initializer=_DENSE_INIT, bias_initializer=_DENSE_INIT,
        name="logits", dtype="float32",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def nam_layers(model):
    """The `NAMAttention` layers of a model, in network order."""
    return [layer for layer in model.layers if isinstance(layer, NAMAttention)]
