"""The warmup-cosine schedule callback and the stop on a non-finite loss."""

import json
import math

import keras
import numpy as np
import pytest

from nam_keras import callbacks
from nam_keras.errors import NonFiniteLossError
from nam_keras.optimizers import TorchSGD


def test_warmup_cosine_values():
    f = lambda s: callbacks.warmup_cosine(s, 0.1, 2000, 10001)
    assert f(0) == 0.0
    assert f(1000) == pytest.approx(0.05)
    assert f(2000) == pytest.approx(0.1)  # end of warmup = peak
    assert f(6000) == pytest.approx(0.05)  # half-way through the cosine
    assert f(2000 + 8000 // 4) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert f(10000) == pytest.approx(0.0, abs=1e-12)  # the last step
    assert f(20000) == pytest.approx(0.0, abs=1e-12)


def test_schedule_callback_uses_the_optimizer_iteration_count():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=TorchSGD(0.0), loss="mse")
    model.optimizer.build(model.trainable_variables)
    callback = callbacks.WarmupCosine(0.1, total_steps=10001, warmup_steps=2000)
    callback.set_model(model)
    model.optimizer.iterations.assign(6000)  # as a resume from a backup restores it
    callback.on_train_batch_begin(0)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs["lr"] == pytest.approx(0.05)
    clone = callbacks.WarmupCosine.from_config(json.loads(json.dumps(callback.get_config())))
    assert clone.lr_at(2000) == pytest.approx(0.1)


def test_stop_on_non_finite_loss_raises_at_the_step():
    stop = callbacks.StopOnNonFiniteLoss()
    stop.on_epoch_begin(2)
    stop.on_train_batch_end(0, {"loss": 1.5})  # finite: nothing happens
    with pytest.raises(NonFiniteLossError, match=r"became inf at step 4 of epoch 3"):
        stop.on_train_batch_end(4, {"loss": np.float32("inf")})


def test_stop_on_signal_waits_for_the_step_to_end_and_restores_handlers():
    import os
    import signal

    from nam_keras.errors import TrainingInterruptedError

    previous = signal.getsignal(signal.SIGTERM)
    stop = callbacks.StopOnSignal()
    stop.on_train_begin()
    stop.on_epoch_begin(2)
    os.kill(os.getpid(), signal.SIGTERM)  # only sets a flag: no exception here
    assert stop.received == signal.SIGTERM
    with pytest.raises(TrainingInterruptedError, match="stopped by SIGTERM during epoch 3") as info:
        stop.on_train_batch_end(0)
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous
