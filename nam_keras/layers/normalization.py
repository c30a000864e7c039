"""The network's BatchNormalization: the reference settings, and TensorFlow's
fused kernel where it applies.

Every BN of `build_resnet` and of the attention modules comes from
`batch_normalization`, so their settings and the fast path live here and
nowhere else.
"""

import contextlib

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


@keras.saving.register_keras_serializable(package="nam_keras")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` with TensorFlow's fused kernel.

    On the TensorFlow backend, for a rank-4 channels-last input without a
    mask, it computes the normalisation with one `FusedBatchNormV3` kernel
    (oneDNN on CPUs, cuDNN on GPUs; one pass over the feature map and one
    for the gradient, no float32 round trip under mixed precision) instead
    of Keras' separate moments, normalisation and casts. Everywhere else
    (other backends, `synchronized=True`, masks, other ranks or axes) it is
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
        fused: `None` (default) uses the fused kernel where it applies;
            `False` always takes Keras' path (the reference the tests compare
            the kernel against). `True` is the same as `None`.
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

    def call(self, inputs, training=None, mask=None, scale_factor=None):
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
