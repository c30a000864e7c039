"""A BatchNormalization and the channel NAM after it, computed as one layer.

In a ResNet block NAM reads the output `y = BN3(x)` of the block's last
BatchNormalization. In training the batch statistics of `y` are known in
closed form: its mean is exactly `beta3` and its biased variance exactly
`gamma3**2 * v / (v + eps3)`, with `v` the batch variance of `x`. So NAM's
own BatchNormalization needs no reductions of its own: NAM's pre-activation
`z = w * BN_nam(y)` is a per-channel affine function of BN3's normalised
value `xhat`, and the whole block end is

    xhat = (x - mean) / sqrt(v + eps3)
    y    = gamma3 * xhat + beta3
    z    = c * xhat + d,    c = w * gamma_nam * gamma3 / sqrt(var_y + eps_nam),  d = w * beta_nam
    out  = sigmoid(z) * y

one element-wise pass forward. Its gradient is written by hand
(`normalization.with_gradient`: `jax.custom_vjp` on JAX, which also means no
forward-mode differentiation there; `keras.ops.custom_gradient` on
TensorFlow): one pass reads the upstream gradient and `x` and produces the
four per-channel sums the gradient needs, in one reduction; a second pass
writes the input gradient. PyTorch leaves the same closed form to autodiff;
TensorFlow without XLA takes it only for 16-bit training steps (see `BatchNormNAM`).
That is what a plain BatchNormalization costs, so NAM's own cost nearly
vanishes. It is the same function as BN3 then `NAMAttention`, so it has the
same gradients; the tests hold it to the unfused layers.

In inference both BatchNormalizations are fixed per-channel affine maps, and
the layer is one affine, a sigmoid and a product.
"""

import keras
from keras import ops

from nam_keras.layers.attention import NAMAttention, register_batch_norm_fusion
from nam_keras.layers.normalization import (
    BN_EPSILON,
    BN_MOMENTUM,
    batch_normalization,
    channel_sums,
    checked_bn_settings,
    moments,
    recomputed,
    update_moving_statistics,
    with_gradient,
    xla_compiles,
)

#: backends whose `keras.ops.custom_gradient` the fused gradient uses; elsewhere
#: (PyTorch) the closed form is left to autodiff, which is the same function.
_CUSTOM_GRADIENT_BACKENDS = ("jax", "tensorflow")


def _nam_scale(v, gamma3, k, eps3, eps_nam):
    """`c = k * gamma3 / sqrt(var_y + eps_nam)` with `var_y = gamma3**2 * v /
    (v + eps3)`, the biased batch variance of BN3's output (`k = w *
    gamma_nam`). Returns `(c, var_y, s)`, `s = 1 / sqrt(var_y + eps_nam)`."""
    var_y = ops.square(gamma3) * v / (v + eps3)
    s = ops.rsqrt(var_y + eps_nam)
    return k * gamma3 * s, var_y, s


def _gate_and_bn_output(xhat, gamma3, beta3, c, d):
    """The two factors of the block end `out = gate * y`: `gate = sigmoid(c *
    xhat + d)` and BN3's output `y = gamma3 * xhat + beta3`."""
    return ops.sigmoid(c * xhat + d), gamma3 * xhat + beta3


def _affine_gated(x, a, b, p, q):
    """`sigmoid(p * x + q) * (a * x + b)`: the block end on per-channel
    coefficients of `x` (computed first: one small pass), in the dtype of `a`."""
    x = ops.cast(x, a.dtype)
    return ops.sigmoid(p * x + q) * (a * x + b)


def _training_forward(x, gamma3, beta3, k, d, eps3, eps_nam, differentiable=False):
    """`(out, (mean, v, var_y), (inv, c, s))`: the block end with batch
    statistics, the statistics, and the per-channel figures of the gradient
    (`differentiable`: autodiff goes through the statistics; see `moments`)."""
    mean, v = moments(ops.cast(x, gamma3.dtype), differentiable=differentiable)
    inv = ops.rsqrt(v + eps3)
    c, var_y, s = _nam_scale(v, gamma3, k, eps3, eps_nam)
    a, p = gamma3 * inv, c * inv
    out = _affine_gated(x, a, beta3 - a * mean, p, d - p * mean)
    return out, (mean, v, var_y), (inv, c, s)


def _training_closed_form(x, gamma3, beta3, k, d, eps3, eps_nam):
    """The block end in training, left to autodiff: `(out, mean, v, var_y)`."""
    out, statistics, _ = _training_forward(x, gamma3, beta3, k, d, eps3, eps_nam, True)
    return (out, *(ops.stop_gradient(t) for t in statistics))


def _training_custom_gradient(eps3, eps_nam):
    """`f(x, gamma3, beta3, k, d) -> (out, mean, v, var_y)` with the hand-written
    gradient (the statistics are for the moving averages: no gradient)."""

    def forward(x, gamma3, beta3, k, d):
        out, (mean, v, var_y), (inv, c, s) = _training_forward(
            x, gamma3, beta3, k, d, eps3, eps_nam
        )
        residuals = (x, mean, inv, v, gamma3, beta3, k, c, d, s)
        return (out, mean, v, var_y), residuals

    def backward(residuals, g):
        grads = _backward(g, *residuals, eps3, eps_nam)
        return (ops.cast(grads[0], residuals[0].dtype), *grads[1:])

    return with_gradient(forward, backward)


def _backward(g, x, mean, inv, v, gamma3, beta3, k, c, d, s, eps3, eps_nam):
    """Gradients of `out` with respect to `(x, gamma3, beta3, k, d)`.

    With `t = g * gate` and `u = g * gate * (1 - gate) * y`, the four sums
    `S_a = sum t*xhat`, `S_b = sum t`, `S_c = sum u*xhat`, `S_d = sum u` over
    the batch and pixels (one variadic reduction) give every per-channel
    gradient; `dxhat = gamma3 * t + c * u`, and the input gradient is the
    BatchNormalization backward of `dxhat` plus the path through `v` in `c`.
    """
    dtype = gamma3.dtype
    n = ops.cast(ops.prod(ops.shape(x)[:-1]), dtype)

    def terms(g, x):
        xhat = (ops.cast(x, dtype) - mean) * inv
        gate, y = _gate_and_bn_output(xhat, gamma3, beta3, c, d)
        t = ops.cast(g, dtype) * gate
        return xhat, t, t * (1.0 - gate) * y

    xhat, t, u = terms(g, x)
    s_a, s_b, s_c, s_d = channel_sums(t * xhat, t, u * xhat, u)
    # c = k * gamma3 * s with s = (gamma3^2 v / (v + eps3) + eps_nam)^(-1/2):
    dc_dv = -0.5 * k * gamma3**3 * s**3 * eps3 * inv**4
    dc_dgamma3 = k * eps_nam * s**3
    # x -> xhat through mean and v (biased), and x -> v -> c:
    dxhat_sum = gamma3 * s_b + c * s_d
    dxhat_xhat_sum = gamma3 * s_a + c * s_c
    offset = -inv * dxhat_sum / n
    slope = (-inv * dxhat_xhat_sum + 2.0 * s_c * dc_dv / inv) / n
    xhat, t, u = terms(*recomputed(g, x))  # a second pass over g and x
    dx = inv * (gamma3 * t + c * u) + offset + slope * xhat
    return (
        dx,
        s_a + s_c * dc_dgamma3,
        s_b,
        s_c * gamma3 * s,
        s_d,
    )


def bn_nam_training(x, gamma3, beta3, k, d, eps3=BN_EPSILON, eps_nam=BN_EPSILON, custom=None):
    """BN3 then channel NAM with batch statistics, fused (see the module).

    Args:
        x: channels-last input of BN3 (any float dtype; computed in the dtype
            of `gamma3`, and its gradient returned in its own).
        gamma3, beta3: BN3's scale and offset, shape `(C,)`, float32 (float64
            for a float64 computation).
        k: `w * gamma_nam` (NAM's channel weight times NAM's BN scale).
        d: `w * beta_nam`.
        eps3, eps_nam: the two BatchNormalizations' epsilons.
        custom: use the hand-written gradient; `None` where the backend has
            `keras.ops.custom_gradient` (JAX, TensorFlow).

    Returns:
        `(out, mean, v, var_y)`: the gated output in the dtype of `gamma3`, BN3's
        batch mean and biased variance, and the biased batch variance of BN3's
        output (NAM's BN batch variance; its batch mean is `beta3`).
    """
    if custom is None:
        custom = keras.backend.backend() in _CUSTOM_GRADIENT_BACKENDS
    if custom:
        return _training_custom_gradient(eps3, eps_nam)(x, gamma3, beta3, k, d)
    return _training_closed_form(x, gamma3, beta3, k, d, eps3, eps_nam)


def bn_nam_inference(x, bn3_stats, nam_stats, gamma3, beta3, k, d, eps3, eps_nam):
    """BN3 then channel NAM with the moving statistics: `sigmoid(p * x + q) *
    (a * x + b)` with per-channel `a, b, p, q` folded from both BNs."""
    mean3, var3 = bn3_stats
    mean_n, var_n = nam_stats
    a = gamma3 * ops.rsqrt(var3 + eps3)
    b = beta3 - a * mean3
    scale_n = k * ops.rsqrt(var_n + eps_nam)
    return _affine_gated(x, a, b, scale_n * a, scale_n * (b - mean_n) + d)


@register_batch_norm_fusion("nam")
@keras.saving.register_keras_serializable(package="nam_keras")
class BatchNormNAM(NAMAttention):
    """A BatchNormalization followed by channel NAM, computed as one layer.

    `BatchNormNAM()(x)` is `NAMAttention()(BatchNormalization()(x))` (the
    reference settings of `batch_normalization`), the same function with the
    same variables: `input_bn` holds the first BN's (`gamma`, `beta`, moving
    statistics), `channel_bn` NAM's, as in `NAMAttention`. In training it
    computes both in one pass with NAM's batch statistics in closed form and a
    hand-written gradient (see the module); in inference it folds both BNs
    into one affine. `build_resnet` uses it for the last BN and the NAM of
    every block (`fuse_attention=True`, the default).

    Where the fused form does not apply (a frozen BN in training, a training
    step with `tf.distribute`'s cross-replica statistics) or does not pay
    (TensorFlow without XLA, whose fused BN kernels are faster there, but for
    a 16-bit training step, where the fused form keeps the modulation) it
    calls its two layers one after the other: the same function.

    Precision: the BNs, the gate and the product are computed in float32
    (float64 in a float64 layer) from the input, whatever the policy, and
    the result is rounded once, to the output dtype. The first BN's output
    is not rounded to 16 bits (it is on the fallback path of two layers), so
    that rounding falls anywhere between two
    bfloat16 values and keeps NAM's small modulation (0.5 + ~1e-4 at
    initialisation) on average, as a dither, where `NAMAttention` after a
    bfloat16 BN output would round it away (the tests measure both). So
    under a mixed policy the output is the compute dtype by default and the
    residual stream after it stays 16-bit.

    Args:
        input_epsilon: epsilon of the first BN. Defaults to `1e-5`.
        input_momentum: momentum of the first BN (Keras' meaning). Defaults
            to `0.9`.
        float32_gate: return float32 under a 16-bit compute dtype (and so
            keep the residual stream after it in float32, as `NAMAttention`
            does by default). Defaults to `False`: the gate is float32 anyway
            (see above), and the wider stream costs memory traffic.
        **kwargs: the arguments of `NAMAttention`, channel attention only
            (`spatial=True` is refused: NAM's pixel BN has no closed form).
    """

    @staticmethod
    def accepts(attention_kwargs):
        """Whether `NAMAttention(**attention_kwargs)` is one this layer fuses
        (channel attention only)."""
        return not attention_kwargs.get("spatial") and attention_kwargs.get("channel", True)

    def __init__(
        self, input_epsilon=BN_EPSILON, input_momentum=BN_MOMENTUM, float32_gate=False, **kwargs
    ):
        if not self.accepts(kwargs):
            raise ValueError(
                "BatchNormNAM fuses channel NAM only; received "
                f"channel={kwargs.get('channel', True)!r}, spatial={kwargs.get('spatial')!r} "
                "(use BatchNormalization then NAMAttention)."
            )
        super().__init__(float32_gate=float32_gate, **kwargs)
        self.input_epsilon, self.input_momentum = checked_bn_settings(
            input_epsilon, input_momentum, prefix="input_"
        )
        self.input_bn = batch_normalization(
            "input_bn",
            synchronized=self.synchronized,
            dtype=self.dtype_policy,
            epsilon=self.input_epsilon,
            momentum=self.input_momentum,
        )

    def build(self, input_shape):
        self.input_bn.build(input_shape)
        super().build(input_shape)

    @property
    def gate_compute_dtype(self):
        """float32, or float64 in a float64 layer: the gate is never 16-bit here."""
        return "float64" if self.compute_dtype == "float64" else "float32"

    def _fusable(self, training):
        """Whether `call` takes the fused form: wherever XLA compiles (JAX; TensorFlow
        in a `jit_compile=True` function), but never for a training step with
        `tf.distribute`'s cross-replica statistics. On TensorFlow without XLA its
        two fused BN kernels run faster than any fused form measured
        (docs/performance.md): there it is taken only where it changes the result,
        a 16-bit training step (the BN output unrounded). In inference too: there
        grappler fuses the first BN into its convolution, and no form of the gate
        measured cheaper (the gate reads `y` twice, so it fills a new buffer per
        block; docs/performance.md, "Serving")."""
        if training and self.input_bn.synchronized:  # tf.distribute's cross-replica statistics
            return False
        if keras.backend.backend() == "tensorflow" and not xla_compiles():
            sixteen_bit = self.compute_dtype in ("float16", "bfloat16")
            return bool(training) and sixteen_bit and self._trains()
        return not training or self._trains()

    def _trains(self):
        return self.input_bn.trainable and self.channel_bn.trainable

    def call(self, inputs, training=None):
        if not self._fusable(training):
            return super().call(self.input_bn(inputs, training=training), training=training)
        dtype = self.gate_compute_dtype
        x = ops.cast(inputs, self.compute_dtype)
        bn3, nam = self.input_bn, self.channel_bn
        gamma3, beta3 = ops.cast(bn3.gamma, dtype), ops.cast(bn3.beta, dtype)
        w = self._gate_weights(nam)
        k = w * ops.cast(nam.gamma, dtype)
        d = w * ops.cast(nam.beta, dtype)
        if training:
            out, mean, v, var_y = bn_nam_training(x, gamma3, beta3, k, d, bn3.epsilon, nam.epsilon)
            update_moving_statistics(bn3, mean, v)
            update_moving_statistics(nam, ops.stop_gradient(beta3), var_y)
        else:
            out = bn_nam_inference(
                x,
                (ops.cast(bn3.moving_mean, dtype), ops.cast(bn3.moving_variance, dtype)),
                (ops.cast(nam.moving_mean, dtype), ops.cast(nam.moving_variance, dtype)),
                gamma3,
                beta3,
                k,
                d,
                bn3.epsilon,
                nam.epsilon,
            )
        self._add_penalty(self._l1(nam.gamma))
        return ops.cast(out, self.gate_dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"input_epsilon": self.input_epsilon, "input_momentum": self.input_momentum})
        return config
