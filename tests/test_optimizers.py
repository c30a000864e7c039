"""TorchSGD: PyTorch's SGD with momentum and coupled weight decay."""

import keras
import numpy as np
import pytest

from nam_keras.training.optimizers import TorchSGD


def averages(optimizer, variables):
    """The optimizer's EMA of each of `variables`, found in its public
    `variables` by name (Keras names it after the model variable's path)."""
    by_name = {v.name: v for v in optimizer.variables}
    return [np.asarray(by_name[v.path.replace("/", "_") + "_average"]) for v in variables]


def test_torch_sgd_matches_the_pytorch_update_by_hand():
    w0 = np.array([1.0, -2.0], "float32")
    var = keras.Variable(w0)
    opt = TorchSGD(learning_rate=0.1, momentum=0.9, l2=0.01)
    g1, g2 = np.array([0.5, 0.25], "float32"), np.array([-0.3, 0.1], "float32")
    opt.apply([g1], [var])
    buf = g1 + 0.01 * w0
    w1 = w0 - 0.1 * buf
    np.testing.assert_allclose(np.asarray(var), w1, rtol=1e-6)
    opt.learning_rate = 0.05  # a changed LR applies to the whole buffer (PyTorch), not just g
    opt.apply([g2], [var])
    buf = 0.9 * buf + g2 + 0.01 * w1
    np.testing.assert_allclose(np.asarray(var), w1 - 0.05 * buf, rtol=1e-6)
    config = opt.get_config()
    assert config["l2"] == 0.01 and config["momentum"] == 0.9
    with pytest.raises(ValueError, match="through `l2=`"):
        TorchSGD(weight_decay=5e-4)


def test_ema_follows_its_recursion_and_replaces_the_weights_at_the_end():
    """`--ema D`: Keras' optimizer EMA, ema = D * ema + (1 - D) * w after every
    step (ema = w after the first), and `fit` ends with the EMA in the model."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=TorchSGD(0.1, use_ema=True, ema_momentum=0.5), loss="mse")
    x, y = np.array([[1.0, 2.0], [3.0, -1.0]], "float32"), np.array([[1.0], [0.0]], "float32")
    seen = []  # the raw weights after every step (one step per epoch: JAX syncs them there)
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(np.asarray(model.weights[0]).copy())
    )
    model.fit(x, y, batch_size=2, epochs=4, shuffle=False, verbose=0, callbacks=[record])
    ema = seen[0]
    for w in seen[1:]:
        ema = 0.5 * ema + 0.5 * w
    np.testing.assert_allclose(np.asarray(model.weights[0]), ema, rtol=1e-6)
    assert not np.allclose(ema, seen[-1])  # the raw weights differ: the EMA was used


def test_the_ema_travels_with_the_weights_file(tmp_path):
    """What a resume relies on: a backup (`save_weights`) holds the optimizer's EMA."""

    def compiled():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=TorchSGD(0.1, use_ema=True, ema_momentum=0.9), loss="mse")
        return model

    model = compiled()
    x, y = np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")
    model.train_on_batch(x, y)
    model.train_on_batch(2 * x, y)
    model.save_weights(tmp_path / "backup.weights.h5")
    restored = compiled()
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(tmp_path / "backup.weights.h5")
    assert int(restored.optimizer.iterations) == 2
    want, got = (averages(m.optimizer, m.trainable_variables) for m in (model, restored))
    assert len(want) == 2 and all(np.array_equal(a, b) for a, b in zip(want, got))
    # what the averages are for: `finalize_variable_values` puts them in the model
    raw = [np.asarray(v) for v in restored.trainable_variables]
    for m in (model, restored):
        m.optimizer.finalize_variable_values(m.trainable_variables)
    for a, b, w in zip(model.get_weights(), restored.get_weights(), raw):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(b, w)  # ema = 0.9 w1 + 0.1 w2 differs from w2
