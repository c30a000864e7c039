"""CIFAR-style ResNets (18/34/50/101/152) with an attention module in every block.

The network is written as Keras' `applications/resnet.py` writes it: blocks
are functions of a tensor, one layer per line, a stage is a stack of blocks,
and `build_resnet` assembles stem, stages and head into a functional model.
"""

import dataclasses

import keras
import numpy as np

from nam_keras import cifar100
from nam_keras.layers import batch_norm_nam  # noqa: F401  (registers NAM's fusion with BN)
from nam_keras.layers.attention import (
    ATTENTIONS,
    BATCH_NORM_FUSIONS,
    NAMAttention,
    create_attention,
)
from nam_keras.layers.initializers import CONV_INIT, DENSE_INIT
from nam_keras.layers.normalization import batch_normalization

#: depth -> (block kind, blocks per stage)
RESNET_CONFIGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
EXPANSION = {"basic": 1, "bottleneck": 4}
STEMS = ("cifar", "imagenet")


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """What every layer of one network shares.

    Attributes:
        dtype: the name of the dtype policy of every layer.
        sync_bn: cross-replica statistics in every BatchNormalization.
        attention: `None` or a function `(channels, name) -> layer` applied
            to the residual branch of every block.
        attention_tag: the suffix of the attention layers' names (`"nam"`).
        fused_attention: `None` or a function `name -> layer` computing the
            branch's last BatchNormalization and the attention as one layer
            (`register_batch_norm_fusion`); used instead of both where given.
    """

    dtype: str = "float32"
    sync_bn: bool = False
    attention: object = None
    attention_tag: str = "attn"
    fused_attention: object = None


# ------------------------------------------------------------------ layers


def conv2d(x, filters, kernel_size, strides, name, settings):
    """A bias-free convolution, padded symmetrically as PyTorch pads.

    Keras' `"same"` padding pads only at the end for even sizes with stride
    2; an explicit `ZeroPadding2D` then `"valid"` matches PyTorch/Paddle.
    """
    padding = "same"
    if strides > 1 and kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad", dtype=settings.dtype)(
            x
        )
        padding = "valid"
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer=CONV_INIT,
        name=name,
        dtype=settings.dtype,
    )(x)


def batch_norm(x, name, settings):
    """The reference BatchNormalization (epsilon 1e-5, momentum 0.9)."""
    return batch_normalization(name, synchronized=settings.sync_bn, dtype=settings.dtype)(x)


def relu(x, name, settings):
    """A ReLU layer."""
    return keras.layers.ReLU(name=name, dtype=settings.dtype)(x)


# ------------------------------------------------------------------ blocks


def apply_shortcut(x, out_channels, strides, name, settings):
    """Identity, or a 1x1 projection + BN where the shape changes."""
    if strides == 1 and x.shape[-1] == out_channels:
        return x
    x = conv2d(x, out_channels, 1, strides, f"{name}_proj_conv", settings)
    return batch_norm(x, f"{name}_proj_bn", settings)


def stream_dtype(x, settings):
    """The dtype policy for layers on the residual stream after `x`.

    The network's policy, except where `x` is float32 under a mixed policy
    (NAM's `float32_gate` output): then float32, so that the addition, the
    ReLU and the pooling do not round NAM's small modulation away.
    """
    compute_dtype = keras.DTypePolicy(settings.dtype).compute_dtype
    wider = keras.backend.standardize_dtype(x.dtype) == "float32" != compute_dtype
    return "float32" if wider else settings.dtype


def apply_block_output(x, residual, bn_name, strides, name, settings):
    """The branch's last BN (named `bn_name`) and attention on the residual
    branch, the shortcut of the block input `x`, the addition and the final
    ReLU. A fused BN+attention layer takes the place of both where there is one."""
    out_channels = residual.shape[-1]
    layer_name = f"{name}_{settings.attention_tag}"
    if settings.fused_attention is not None:
        residual = settings.fused_attention(layer_name)(residual)
    else:
        residual = batch_norm(residual, bn_name, settings)
        if settings.attention is not None:
            residual = settings.attention(out_channels, layer_name)(residual)
    shortcut = apply_shortcut(x, out_channels, strides, name, settings)
    dtype = stream_dtype(residual, settings)
    y = keras.layers.Add(name=f"{name}_add", dtype=dtype)([residual, shortcut])
    return keras.layers.ReLU(name=f"{name}_out", dtype=dtype)(y)


def apply_basic_block(x, filters, strides, name, settings):
    """Two 3x3 convolutions (ResNet-18/34); `filters` output channels."""
    y = conv2d(x, filters, 3, strides, f"{name}_conv1", settings)
    y = batch_norm(y, f"{name}_bn1", settings)
    y = relu(y, f"{name}_relu1", settings)
    y = conv2d(y, filters, 3, 1, f"{name}_conv2", settings)
    return apply_block_output(x, y, f"{name}_bn2", strides, name, settings)


def apply_bottleneck_block(x, filters, strides, name, settings):
    """1x1, 3x3 (strided), 1x1 convolutions; `4 * filters` output channels."""
    out_channels = filters * EXPANSION["bottleneck"]
    y = conv2d(x, filters, 1, 1, f"{name}_conv1", settings)
    y = batch_norm(y, f"{name}_bn1", settings)
    y = relu(y, f"{name}_relu1", settings)
    y = conv2d(y, filters, 3, strides, f"{name}_conv2", settings)
    y = batch_norm(y, f"{name}_bn2", settings)
    y = relu(y, f"{name}_relu2", settings)
    y = conv2d(y, out_channels, 1, 1, f"{name}_conv3", settings)
    return apply_block_output(x, y, f"{name}_bn3", strides, name, settings)


BLOCKS = {"basic": apply_basic_block, "bottleneck": apply_bottleneck_block}


def apply_stage(x, kind, filters, blocks, strides, name, settings):
    """`blocks` residual blocks; the first one carries the stage's stride."""
    for b in range(1, blocks + 1):
        x = BLOCKS[kind](x, filters, strides if b == 1 else 1, f"{name}_block{b}", settings)
    return x


def apply_stem(x, stem, filters, settings):
    """CIFAR stem (3x3/1 conv, no pooling) or ImageNet stem (7x7/2 + max-pool)."""
    if stem == "cifar":
        x = conv2d(x, filters, 3, 1, "stem_conv", settings)
    else:
        x = conv2d(x, filters, 7, 2, "stem_conv", settings)
    x = batch_norm(x, "stem_bn", settings)
    x = relu(x, "stem_relu", settings)
    if stem == "imagenet":
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad", dtype=settings.dtype)(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool", dtype=settings.dtype)(x)
    return x


def apply_normalization(x, dtype):
    """Raw [0, 255] pixels -> CIFAR-100 standardised; holds no weights."""
    return keras.layers.Normalization(
        mean=[255.0 * m for m in cifar100.MEAN],
        variance=[(255.0 * s) ** 2 for s in cifar100.STD],
        name="normalize",
        dtype=dtype,
    )(x)


# ------------------------------------------------------------------ builder


def _positive_int(value, what):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{what}` must be a positive integer; received {value!r}.")


def _validate(depth, num_classes, input_shape, stem, normalize_inputs, width):
    if depth not in RESNET_CONFIGS:
        raise ValueError(f"Unsupported depth {depth!r}; expected one of {sorted(RESNET_CONFIGS)}.")
    if stem not in STEMS:
        raise ValueError(f"Unknown stem {stem!r}; expected one of {list(STEMS)}.")
    _positive_int(num_classes, "num_classes")
    _positive_int(width, "width")
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


def attention_settings(attention, attention_kwargs, dtype, sync_bn):
    """`(factory, tag, placement)` from `build_resnet`'s arguments.

    A registry name gives `create_attention(name, ...)` with the network's
    dtype and BN synchronisation, placed where its class says (`placement`:
    `"block"` or `"stage"`); a callable is called as
    `attention(channels, name, **attention_kwargs)` in every block.
    """
    kwargs = dict(attention_kwargs or {})
    if attention is None:
        if kwargs:
            raise ValueError(f"attention_kwargs={kwargs!r} given with attention=None.")
        return None, "plain", "block"
    if isinstance(attention, str):
        if attention not in ATTENTIONS:
            raise ValueError(
                f"Unknown attention {attention!r}; expected one of {sorted(ATTENTIONS)}, "
                "None, or a callable (channels, name) -> layer."
            )
        options = {"synchronized": sync_bn, **kwargs}

        def factory(channels, name):
            del channels  # registered layers infer their width from the input
            return create_attention(attention, name, dtype=dtype, **options)

        return factory, attention, getattr(ATTENTIONS[attention], "placement", "block")
    if callable(attention):
        return (lambda channels, name: attention(channels, name, **kwargs)), "attn", "block"
    raise ValueError(
        f"`attention` must be one of {sorted(ATTENTIONS)}, None, or a callable "
        f"(channels, name) -> layer; received {attention!r}."
    )


def fused_attention_settings(attention, attention_kwargs, dtype, sync_bn):
    """A function `name -> layer` computing the block's last BN and the
    registered `attention` as one layer (`register_batch_norm_fusion`), or
    `None` where the attention has no such form or not with these arguments."""
    fused = BATCH_NORM_FUSIONS.get(attention) if isinstance(attention, str) else None
    kwargs = dict(attention_kwargs or {})
    if fused is None or not fused.accepts(kwargs):
        return None
    options = {"synchronized": sync_bn, **kwargs}
    return lambda name: fused(name=name, dtype=dtype, **options)


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
    fuse_attention=True,
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
        attention: a name registered with `register_attention` (`"nam"`,
            the default), `None` for the plain ResNet, or a callable
            `(channels, name) -> keras.layers.Layer` (timm's `attn_layer`
            hook). A block module (`"nam"`, `"se"`, `"cbam"`, a callable) is
            applied in every block after the last BN of the residual branch,
            before the addition with the shortcut; a stage module (`"bam"`)
            after every stage but the last.
        input_shape: `(height, width, channels)`; defaults to `(32, 32, 3)`.
        stem: `"cifar"` (3x3/1 conv, no pooling; default) or `"imagenet"`
            (7x7/2 conv and 3x3/2 max-pool).
        attention_kwargs: extra arguments for the attention layers, e.g.
            `{"spatial": True}` or `{"sparsity": 0.0}` for NAM.
        normalize_inputs: put the fixed CIFAR-100 mean/std normalisation in
            the model. Defaults to `True`.
        width: channels of the stem and of the first stage (64 in the paper);
            a smaller value gives a narrow network for tests and smoke runs.
        sync_bn: synchronise the batch statistics of every BatchNormalization
            (the attention modules' included) across the replicas of a
            `tf.distribute` strategy, so that several devices train like one
            device on the global batch.
        dtype: dtype policy for every layer (e.g. `"mixed_bfloat16"`), given
            to each layer explicitly; `None` takes the global policy once, here
            (as a Keras layer does). The logits are always float32.
        fuse_attention: where the attention has a form fused with the
            BatchNormalization in front of it (NAM with channel attention:
            `BatchNormNAM`), compute the block's last BN and the attention as
            that one layer, named like the attention layer (the same function
            and variables, a fraction of the memory traffic). `False` builds
            the two layers one after the other (`stage1_block1_bn3`, then
            `stage1_block1_nam`): the reference the fused form is tested
            against. One difference under a mixed policy: the fused layer
            returns the compute dtype (its gate is float32 from an unrounded
            BN output), `NAMAttention` float32 (`float32_gate`); pass
            `attention_kwargs={"float32_gate": True}` for a float32 stream
            after the fused one too. `weights_by_name` matches the weights of
            the two layouts. Defaults to `True`.
        name: model name; defaults to e.g. `"resnet50_nam"`.

    Returns:
        A `keras.Model` from `images` `(N, *input_shape)` to float32 logits
        `(N, num_classes)`. Layers are named `stem_conv`,
        `stage2_block3_nam`, `stage4_block1_proj_conv`, ...

    Example:

    >>> import nam_keras
    >>> model = nam_keras.build_resnet(depth=50, num_classes=100)
    >>> model.count_params()
    23818788
    >>> tiny = nam_keras.build_resnet(depth=18, width=8, input_shape=(16, 16, 3))
    >>> tiny.output_shape
    (None, 100)
    """
    input_shape = tuple(input_shape)
    _validate(depth, num_classes, input_shape, stem, normalize_inputs, width)
    dtype = keras.dtype_policies.get(dtype if dtype is not None else keras.config.dtype_policy())
    dtype = dtype.name
    factory, tag, placement = attention_settings(attention, attention_kwargs, dtype, sync_bn)
    in_blocks = factory if placement == "block" else None
    fused = None
    if fuse_attention and in_blocks is not None:
        fused = fused_attention_settings(attention, attention_kwargs, dtype, sync_bn)
    settings = BlockSettings(
        dtype=dtype, sync_bn=sync_bn, attention=in_blocks, attention_tag=tag, fused_attention=fused
    )
    kind, blocks_per_stage = RESNET_CONFIGS[depth]

    # === Functional Model ===
    inputs = keras.Input(shape=input_shape, name="images")
    x = apply_normalization(inputs, dtype) if normalize_inputs else inputs
    x = apply_stem(x, stem, width, settings)
    stages = zip(blocks_per_stage, STAGE_WIDTHS, STAGE_STRIDES)
    for s, (blocks, stage_width, strides) in enumerate(stages, start=1):
        filters = stage_width * width // 64
        x = apply_stage(x, kind, filters, blocks, strides, f"stage{s}", settings)
        if placement == "stage" and s < len(STAGE_WIDTHS):  # BAM: between stages
            x = factory(x.shape[-1], f"stage{s}_{tag}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool", dtype=stream_dtype(x, settings))(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=DENSE_INIT,
        bias_initializer=DENSE_INIT,
        name="logits",
        dtype="float32",
    )(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}_{tag}")


def weights_by_name(model):
    """The model's weights keyed by a name that both layouts of a block end
    share: `stage1_block1_bn3/gamma` is the first BN's gamma whether the block
    has a `stage1_block1_bn3` layer (`fuse_attention=False`, or a file of
    version 0.3) or a fused `stage1_block1_nam` holding it as `input_bn`; every
    other weight is keyed by its path.

    Args:
        model: a `keras.Model` from `build_resnet`.

    Returns:
        A dict from those names to the model's variables, in the model's order.
    """
    names = {layer.name for layer in model.layers}
    out = {}
    for layer in model.layers:
        fused = getattr(layer, "input_bn", None)
        for var in layer.weights:
            key = var.path
            if fused is not None and key.startswith(f"{layer.name}/{fused.name}/"):
                block = layer.name.rsplit("_", 1)[0]
                bn = "bn3" if f"{block}_conv3" in names else "bn2"
                key = f"{block}_{bn}/{var.name}"
            out[key] = var
    return out


def nam_layers(model):
    """The `NAMAttention` layers of a model, in network order.

    Args:
        model: a `keras.Model`.

    Returns:
        A list of `NAMAttention` layers (empty for a model without NAM).
    """
    return [layer for layer in model.layers if isinstance(layer, NAMAttention)]


def nam_weight_figures(model_or_layers, near_zero=0.1):
    """The NAM weights `w = |gamma| / sum |gamma|` relative to the uniform
    weight `1 / C` (`w * C`: 1.0 = uniform), and how many are near zero:
    below `near_zero` times the uniform weight. The evaluation's NAM report
    and the training logs' `nam_near_zero` / `nam_max_weight` are these.

    Args:
        model_or_layers: a `keras.Model`, or a list of `NAMAttention` layers.
        near_zero: the threshold, a fraction of the uniform weight.

    Returns:
        `None` without NAM layers; else a dict with
        - `"layers"`: per NAM layer in network order, `{"layer": name, kind:
          {"weights": w, "relative": w * C, "near_zero": count}}` for each kind
          (`"channel"`, `"spatial"`) the layer has; float64 NumPy arrays;
        - `"channels"`, `"near_zero_channels"`, `"near_zero_fraction"` and
          `"max_relative"`: over the channel weights of every layer (0 and
          `None` when no layer has channel weights).
    """
    if isinstance(model_or_layers, keras.Model):
        model_or_layers = nam_layers(model_or_layers)
    entries = [_nam_layer_figures(layer, near_zero) for layer in model_or_layers]
    if not entries:
        return None
    channel = [entry["channel"] for entry in entries if "channel" in entry]
    count = sum(c["weights"].size for c in channel)
    below = sum(c["near_zero"] for c in channel)
    return {
        "layers": entries,
        "channels": count,
        "near_zero_channels": below,
        "near_zero_fraction": below / max(count, 1),
        "max_relative": max((float(c["relative"].max()) for c in channel), default=None),
    }


def _nam_layer_figures(layer, near_zero):
    entry = {"layer": layer.name}
    for kind, weights in layer.attention_weights().items():
        weights = np.asarray(weights, np.float64)
        relative = weights * weights.size
        below = int((relative < near_zero).sum())
        entry[kind] = {"weights": weights, "relative": relative, "near_zero": below}
    return entry


def forward_multiply_adds(model):
    """Multiply-adds of one forward pass per image: every `Conv2D` and
    `Dense` layer of the model, and the attention layers' own (their
    `multiply_adds(input_shape)`); BN, activations and pooling are not counted.

    Args:
        model: a built `keras.Model` with static spatial shapes.

    Returns:
        An integer.
    """
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in, _ = layer.kernel.shape
            macs += h * w * kh * kw * c_in * c_out
        elif isinstance(layer, keras.layers.Dense):
            macs += int(layer.kernel.shape[0] * layer.kernel.shape[1])
        elif hasattr(layer, "multiply_adds"):
            macs += layer.multiply_adds(layer.input.shape)
    return macs
