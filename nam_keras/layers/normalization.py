"""The network's BatchNormalization: the reference settings, and a fast path
on each backend where it applies: where XLA compiles the step (JAX; TensorFlow
with `jit_compile=True`, Keras' "auto" on a GPU), a hand-written gradient whose
reductions XLA fuses into one pass each way; on TensorFlow without XLA, the
fused kernel.

Every BN of `build_resnet` and of the attention modules comes from
`batch_normalization`, so their settings and the fast paths live here and
nowhere else; the per-channel reductions and moving averages that
`BatchNormNAM` shares with it too.
"""

import contextlib
import functools

import keras
from keras import ops

#: BatchNormalization settings of the Paddle/PyTorch reference (Keras' own
#: defaults, 1e-3 and 0.99, give a different model).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

_FUSED_DTYPES = ("float32", "float16", "bfloat16")
_default_fused = [None]


@contextlib.contextmanager
def fused_kernels(enabled):
    """Within the block, new `FusedBatchNormalization` layers built without a
    `fused=` argument get `fused=enabled`: `fused_kernels(False)` builds a
    network on Keras' own BN path (benchmarks, debugging).
    """
    _default_fused.append(None if enabled else False)
    try:
        yield
    finally:
        _default_fused.pop()


def checked_bn_settings(epsilon, momentum, prefix=""):
    """`(float(epsilon), float(momentum))` of a BatchNormalization, or a
    `ValueError` naming the argument (`prefix` + `epsilon`/`momentum`) and what
    it received."""
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"`{prefix}momentum` must be in [0, 1); received {momentum!r}.")
    if not float(epsilon) > 0.0:
        raise ValueError(f"`{prefix}epsilon` must be > 0; received {epsilon!r}.")
    return float(epsilon), float(momentum)


def xla_compiles():
    """Whether XLA compiles the computation being traced: always on JAX; on
    TensorFlow inside a `jit_compile=True` function (a Keras step with
    `jit_compile=True`, Keras' "auto" on a GPU). There XLA fuses element-wise
    work into the passes around it, so the hand-written gradients pay on both;
    without XLA TensorFlow's fused BN kernels are faster."""
    backend = keras.backend.backend()
    if backend == "jax":
        return True
    if backend != "tensorflow":
        return False
    import tensorflow as tf

    try:  # TF's own test of an XLA context (private: without it, TF's BN kernels, also right)
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
    except ImportError:
        return False
    return bool(GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def channel_sums(*terms, differentiable=False):
    """Per-channel sums over every axis but the last of each channels-last term.

    Where XLA compiles (`xla_compiles`) all of them are one variadic
    reduction, which XLA fuses with the element-wise producers of its
    operands: one read of their inputs, none of the terms written out
    (separate sums make XLA write the terms first). TensorFlow's variadic
    reduction has no gradient: `differentiable=True` (sums that autodiff
    goes through) takes plain sums there.
    """
    axes = tuple(range(len(terms[0].shape) - 1))
    backend = keras.backend.backend()
    if backend == "jax":
        from jax import lax

        zeros = tuple(ops.zeros((), t.dtype) for t in terms)
        return lax.reduce(terms, zeros, lambda a, b: tuple(p + q for p, q in zip(a, b)), axes)
    if xla_compiles() and not differentiable:  # TensorFlow in an XLA-compiled function
        from tensorflow.compiler.tf2xla.python import xla

        zeros = [ops.zeros((), t.dtype) for t in terms]
        adder = _tensorflow_adder(tuple(t.dtype for t in terms))
        return xla.variadic_reduce(list(terms), zeros, list(axes), adder)
    return [ops.sum(t, axis=axes) for t in terms]


@functools.cache
def _tensorflow_adder(dtypes):
    """The reducer of `channel_sums` on TensorFlow: `(a..., b...) -> a + b`, elementwise."""
    import tensorflow as tf

    n = len(dtypes)

    def add(*ab):
        return tuple(ab[i] + ab[n + i] for i in range(n))

    specs = [tf.TensorSpec((), dtype) for dtype in dtypes] * 2
    return tf.function(add, autograph=False).get_concrete_function(*specs)


def recomputed(*tensors):
    """`tensors` unchanged; where XLA compiles, behind an optimisation barrier,
    so that XLA recomputes what a second pass derives from them instead of
    sharing (and so writing out) the first pass's intermediate values."""
    backend = keras.backend.backend()
    if backend == "jax":
        from jax import lax

        return lax.optimization_barrier(tensors)
    if xla_compiles():  # TensorFlow in an XLA-compiled function
        from tensorflow.compiler.tf2xla.python import xla

        return tuple(xla.optimization_barrier(*tensors))
    return tensors


def moments(x, differentiable=False):
    """Per-channel batch mean and biased variance of a channels-last `x`, in
    one pass: the sums of `x - k` and `(x - k)**2`, with `k` the first pixel
    of each channel. Shifted by a value of the same channel, the variance
    keeps its precision when the mean is large against the spread (unshifted,
    `E[x**2] - mean**2` in float32 loses it all from about mean / std = 100).
    `differentiable`: see `channel_sums`."""
    n = ops.cast(ops.prod(ops.shape(x)[:-1]), x.dtype)
    shift = ops.stop_gradient(ops.reshape(x, (-1, ops.shape(x)[-1]))[0])
    shifted = x - shift
    total, squares = channel_sums(shifted, ops.square(shifted), differentiable=differentiable)
    offset = total / n
    return shift + offset, ops.maximum(squares / n - ops.square(offset), 0.0)


def update_moving_statistics(bn, mean, variance):
    """Keras' moving-average update of `bn` (biased batch variance)."""
    m = bn.momentum
    bn.moving_mean.assign(bn.moving_mean * m + ops.cast(mean, bn.moving_mean.dtype) * (1.0 - m))
    bn.moving_variance.assign(
        bn.moving_variance * m + ops.cast(variance, bn.moving_variance.dtype) * (1.0 - m)
    )


def with_gradient(forward, backward):
    """A function with a hand-written gradient and explicit residuals.

    `forward(*args) -> (outputs, residuals)`, where `outputs[0]` is the only
    output with a gradient (the others are statistics); `backward(residuals,
    upstream) -> one gradient per argument`, `upstream` the gradient of
    `outputs[0]`. On JAX this is `jax.custom_vjp`: the backward pass keeps
    exactly `residuals` from the forward one (with `keras.ops.custom_gradient`
    JAX would evaluate, in the forward pass, every part of the backward that
    does not depend on `upstream` and keep it, full-size, until the backward
    pass). Elsewhere it is `keras.ops.custom_gradient`.
    """
    if keras.backend.backend() == "jax":
        import jax

        @jax.custom_vjp
        def function(*args):
            return forward(*args)[0]

        def vjp_backward(residuals, cotangents):
            return tuple(backward(residuals, cotangents[0]))

        function.defvjp(forward, vjp_backward)
        return function

    @ops.custom_gradient
    def function(*args):
        outputs, residuals = forward(*args)

        def grad(*upstreams, upstream=None):
            g = upstream if upstream is not None else upstreams
            while isinstance(g, (tuple, list)):  # one per output; the first has a gradient
                g = g[0]
            return tuple(backward(residuals, g))

        return outputs, grad

    return function


def _normalize_forward(epsilon):
    def forward(x, gamma, beta):
        xf = ops.cast(x, gamma.dtype)
        mean, var = moments(xf)
        inv = ops.rsqrt(var + epsilon)
        scale = inv * gamma  # per-channel coefficients of x first: one small pass
        y = ops.cast(xf * scale + (beta - scale * mean), x.dtype)
        return (y, mean, var), (x, gamma, mean, inv)

    return forward


def _normalize_backward(residuals, g):
    x, gamma, mean, inv = residuals
    dtype = gamma.dtype
    n = ops.cast(ops.prod(ops.shape(x)[:-1]), dtype)

    def terms(g, x):
        return ops.cast(g, dtype), (ops.cast(x, dtype) - mean) * inv

    g32, xhat = terms(g, x)
    sum_g, sum_g_xhat = channel_sums(g32, g32 * xhat)
    g32, xhat = terms(*recomputed(g, x))  # a second pass over g and x
    dx = (gamma * inv) * (g32 - sum_g / n - xhat * (sum_g_xhat / n))
    return ops.cast(dx, x.dtype), sum_g_xhat, sum_g


def batch_norm_training(x, gamma, beta, epsilon):
    """`(gamma * (x - mean) / sqrt(var + epsilon) + beta, mean, var)` over the
    batch (every axis but the last), with a hand-written gradient.

    Computed in the dtype of `gamma` (float32 for 16-bit inputs), returned in
    the dtype of `x`. Forward: one pass for both sums (`channel_sums`), one
    for the output. Backward: one pass for the two sums the gradient needs,
    one for the input gradient (`recomputed` keeps XLA from writing the
    first pass's values out for the second); the residuals are `x` and
    per-channel figures. Keras' own BN left to autodiff makes XLA write
    several full-size float32 intermediates instead.
    """
    return with_gradient(_normalize_forward(epsilon), _normalize_backward)(x, gamma, beta)


@keras.saving.register_keras_serializable(package="nam_keras")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` with a fast path on each backend.

    In training where XLA compiles the step (`xla_compiles`: JAX, or
    TensorFlow in a `jit_compile=True` function) it is `batch_norm_training`,
    a hand-written gradient with one pass for both batch sums forward and one
    each way backward. Otherwise on TensorFlow, for a rank-4 channels-last
    input without a mask, it computes the normalisation with one
    `FusedBatchNormV3` kernel (oneDNN on CPUs, cuDNN on GPUs; one pass over
    the feature map and one for the gradient, no float32 round trip under
    mixed precision) instead of Keras' separate moments, normalisation and
    casts. Everywhere else (PyTorch; where XLA compiles, inference and frozen
    BNs; `synchronized=True` on TensorFlow; masks, other ranks or axes) it is
    `keras.layers.BatchNormalization` unchanged.

    Both paths hold the same variables under the same names and update the
    moving statistics identically, with Keras' meaning of momentum and the
    **biased** batch variance (the kernel's unbiased variance is rescaled by
    `(n - 1) / n`), so a model trains and predicts the same on every
    backend, and its `.keras` files load into `keras.layers.BatchNormalization`.
    PyTorch keeps the unbiased variance in its running statistics; the
    difference is a factor `n / (n - 1)` with `n` = batch x height x width
    (1.00002 for batch 64 on 32x32).

    Args:
        fused: `None` (default) uses the fast paths (the hand-written
            gradient, the fused kernel) where they apply; `False` always takes
            Keras' path (the reference the tests compare them against). `True`
            is the same as `None`.
        **kwargs: the arguments of `keras.layers.BatchNormalization`.

    Call arguments:
        inputs: the tensor to normalise.
        training: Python boolean: batch statistics (and a moving-statistics
            update) or the moving statistics.
        mask: as in `keras.layers.BatchNormalization` (Keras' path).
        scale_factor: optional per-feature factor `f`; the layer then returns
            `f * BN(x)`, computed in the same kernel by scaling gamma and beta
            (how `NAMAttention` weights its BN output without another pass).
    """

    def __init__(self, fused=None, synchronized=False, **kwargs):
        # `synchronized` is a tf.distribute notion, which Keras refuses on other
        # backends. There the layer uses the statistics of the batch it sees (under
        # keras.distribution's data parallelism on JAX that batch is one sharded
        # array, so its statistics are the global batch's), and it keeps the
        # setting in its config, so a model saved on TensorFlow loads everywhere.
        tensorflow = keras.backend.backend() == "tensorflow"
        super().__init__(synchronized=bool(synchronized) and tensorflow, **kwargs)
        self.requested_synchronized = bool(synchronized)
        self.fused = _default_fused[-1] if fused is None else fused

    def _uses_fused_kernel(self, inputs, mask):
        return (
            self.fused is not False
            and keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.synchronized
            and not getattr(self, "renorm", False)
            and self.scale
            and self.center
            and len(inputs.shape) == 4
            and self.axis % 4 == 3
            and keras.backend.standardize_dtype(inputs.dtype) in _FUSED_DTYPES
        )

    def _uses_custom_gradient(self, inputs, mask, training):
        return (
            self.fused is not False
            and not self.synchronized
            and xla_compiles()
            and training
            and self.trainable
            and mask is None
            and not getattr(self, "renorm", False)
            and self.scale
            and self.center
            and self.axis % len(inputs.shape) == len(inputs.shape) - 1
        )

    def call(self, inputs, training=None, mask=None, scale_factor=None):
        if self._uses_custom_gradient(inputs, mask, training):
            return self._custom_gradient_call(inputs, scale_factor)
        if self._uses_fused_kernel(inputs, mask):
            return self._fused_call(inputs, training, scale_factor)
        outputs = super().call(inputs, training=training, mask=mask)
        if scale_factor is not None:
            outputs = outputs * ops.cast(scale_factor, outputs.dtype)
        return outputs

    def _fused_call(self, inputs, training, scale_factor):
        import tensorflow as tf

        x = tf.cast(inputs, self.compute_dtype)
        gamma = tf.cast(self.gamma, "float32")
        beta = tf.cast(self.beta, "float32")
        if scale_factor is not None:
            factor = tf.cast(scale_factor, "float32")
            gamma, beta = gamma * factor, beta * factor
        empty = tf.constant([], "float32")
        if training and self.trainable:
            y, mean, unbiased_var = tf.raw_ops.FusedBatchNormV3(
                x=x,
                scale=gamma,
                offset=beta,
                mean=empty,
                variance=empty,
                epsilon=self.epsilon,
                data_format="NHWC",
                is_training=True,
            )[:3]
            n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), "float32")
            variance = unbiased_var * ((n - 1.0) / tf.maximum(n, 1.0))
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
            return y
        return tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=gamma,
            offset=beta,
            mean=tf.cast(self.moving_mean, "float32"),
            variance=tf.cast(self.moving_variance, "float32"),
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=False,
        )[0]

    def _custom_gradient_call(self, inputs, scale_factor):
        dtype = "float64" if self.compute_dtype == "float64" else "float32"
        gamma = ops.cast(self.gamma, dtype)
        beta = ops.cast(self.beta, dtype)
        if scale_factor is not None:
            factor = ops.cast(scale_factor, dtype)
            gamma, beta = gamma * factor, beta * factor
        x = ops.cast(inputs, self.compute_dtype)
        y, mean, var = batch_norm_training(x, gamma, beta, self.epsilon)
        update_moving_statistics(self, ops.stop_gradient(mean), ops.stop_gradient(var))
        return y

    def get_config(self):
        config = super().get_config()
        return {**config, "fused": self.fused, "synchronized": self.requested_synchronized}


def batch_normalization(
    name,
    axis=-1,
    synchronized=False,
    dtype=None,
    gamma_initializer="ones",
    epsilon=BN_EPSILON,
    momentum=BN_MOMENTUM,
):
    """A BatchNormalization with the reference settings (the fused one on TensorFlow).

    Args:
        name: layer name.
        axis: the feature axis. Defaults to `-1` (channels last).
        synchronized: batch statistics over all replicas of a `tf.distribute`
            strategy (TensorFlow backend; takes Keras' unfused path). Defaults
            to `False`.
        dtype: dtype policy of the layer; `None` uses the global policy.
        gamma_initializer: initializer of the scale. Defaults to `"ones"`.
        epsilon: defaults to `1e-5`.
        momentum: in Keras' meaning (`moving = momentum * moving + (1 - momentum)
            * batch`). Defaults to `0.9`.

    Returns:
        An unbuilt `FusedBatchNormalization`.
    """
    return FusedBatchNormalization(
        axis=axis,
        epsilon=epsilon,
        momentum=momentum,
        gamma_initializer=gamma_initializer,
        synchronized=synchronized,
        dtype=dtype,
        name=name,
    )
