"""The one place where the network's BatchNormalization layers are made.

Every BN of `build_resnet` and of the attention modules comes from
`batch_normalization`, so their settings (and any backend-specific fast path)
live here and nowhere else.
"""

import keras

#: BatchNormalization settings of the Paddle/PyTorch reference (Keras' own
#: defaults, 1e-3 and 0.99, give a different model).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def batch_normalization(
    name,
    axis=-1,
    synchronized=False,
    dtype=None,
    gamma_initializer="ones",
    epsilon=BN_EPSILON,
    momentum=BN_MOMENTUM,
):
    """A `keras.layers.BatchNormalization` with the reference settings.

    Args:
        name: layer name.
        axis: the feature axis. Defaults to `-1` (channels last).
        synchronized: batch statistics over all replicas of a `tf.distribute`
            strategy (TensorFlow backend). Defaults to `False`.
        dtype: dtype policy of the layer; `None` uses the global policy.
        gamma_initializer: initializer of the scale. Defaults to `"ones"`.
        epsilon: defaults to `1e-5`.
        momentum: in Keras' meaning (`moving = momentum * moving + (1 - momentum)
            * batch`). Defaults to `0.9`.

    Returns:
        An unbuilt `keras.layers.BatchNormalization`.
    """
    return keras.layers.BatchNormalization(
        axis=axis,
        epsilon=epsilon,
        momentum=momentum,
        gamma_initializer=gamma_initializer,
        synchronized=synchronized,
        dtype=dtype,
        name=name,
    )
