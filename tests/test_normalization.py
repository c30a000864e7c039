"""The one BatchNormalization factory: reference settings, passed-through options."""

import keras
import numpy as np

from nam_keras.normalization import BN_EPSILON, BN_MOMENTUM, batch_normalization


def test_reference_settings_and_options():
    bn = batch_normalization("bn")
    assert isinstance(bn, keras.layers.BatchNormalization)
    assert (bn.epsilon, bn.momentum, bn.axis, bn.synchronized) == (1e-5, 0.9, -1, False)
    assert (BN_EPSILON, BN_MOMENTUM) == (1e-5, 0.9)
    bn = batch_normalization(
        "b2", axis=1, synchronized=True, dtype="mixed_bfloat16", gamma_initializer="zeros"
    )
    assert (bn.name, bn.axis, bn.synchronized, bn.compute_dtype) == ("b2", 1, True, "bfloat16")
    bn.build((2, 3, 4))
    np.testing.assert_array_equal(bn.gamma.numpy(), np.zeros(3))


def test_training_output_by_hand(rng):
    x = rng.normal(size=(16, 5)).astype("float32")
    y = batch_normalization("bn")(x, training=True)
    want = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
