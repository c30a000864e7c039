"""The NAM sparsity and speed figures, and the stops on a non-finite loss and on
signals (the learning-rate schedules: tests/test_schedules.py)."""

import numpy as np
import pytest

from nam_keras.errors import NonFiniteLossError
from nam_keras.training import callbacks


def test_stop_on_non_finite_loss_raises_at_the_step():
    stop = callbacks.StopOnNonFiniteLoss()
    stop.on_epoch_begin(2)
    stop.on_train_batch_end(0, {"loss": 1.5})  # finite: nothing happens
    with pytest.raises(NonFiniteLossError, match=r"became inf at step 4 of epoch 3"):
        stop.on_train_batch_end(4, {"loss": np.float32("inf")})


def test_stop_on_signal_waits_for_the_step_to_end_and_restores_handlers(capsys):
    import os
    import signal

    from nam_keras.errors import TrainingInterruptedError

    previous = signal.getsignal(signal.SIGTERM)
    stop = callbacks.StopOnSignal()
    stop.set_params({"verbose": 1})  # a progress bar: the message starts a new line
    stop.on_train_begin()
    stop.on_epoch_begin(2)
    os.kill(os.getpid(), signal.SIGTERM)  # only sets a flag: no exception here
    assert stop.received == signal.SIGTERM
    with pytest.raises(TrainingInterruptedError, match="stopped by SIGTERM during epoch 3") as info:
        stop.on_train_batch_end(0)
    assert info.value.signum == signal.SIGTERM
    assert capsys.readouterr().out == "\n"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_nam_sparsity_figures_by_hand():
    from nam_keras import build_resnet, nam_layers

    model = build_resnet(depth=18, width=4, input_shape=(8, 8, 3))
    layers = nam_layers(model)
    gamma = np.ones(4, "float32")
    gamma[0] = 0.01  # w * C = 4 * 0.01 / 3.01 < 0.1; the others 4 / 3.01
    layers[0].channel_bn.gamma.assign(gamma)
    channels = sum(layer.channel_bn.gamma.shape[0] for layer in layers)
    sparsity = callbacks.NAMSparsity(near_zero=0.1)
    sparsity.set_model(model)
    logs = {}
    sparsity.on_epoch_end(0, logs)
    assert logs["nam_near_zero"] == pytest.approx(1 / channels)
    assert logs["nam_max_weight"] == pytest.approx(4 / 3.01)
    plain = build_resnet(depth=18, width=4, input_shape=(8, 8, 3), attention=None)
    sparsity.set_model(plain)
    assert sparsity.figures() == {}


def test_training_speed_excludes_compilation_and_validation(monkeypatch):
    # first epoch: begins at 10 s, its first step (compiling) ends at 30 s, validation
    # begins at 32 s; second epoch: begins at 40 s, validation at 42 s
    clock = iter([10.0, 30.0, 32.0, 40.0, 42.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    speed = callbacks.TrainingSpeed(batch_size=32)
    speed.set_params({"steps": 5})
    speed.on_train_begin()
    for epoch, steps_timed in ((0, 4), (1, 5)):
        speed.on_epoch_begin(epoch)
        for step in range(5):
            speed.on_train_batch_end(step)
        speed.on_test_begin()
        logs = {}
        speed.on_epoch_end(epoch, logs)  # no further clock reading: validation not counted
        assert logs["train_images_per_s"] == steps_timed * 32 / 2.0


def test_epoch_time_estimate_from_the_first_steps(monkeypatch, caplog):
    clock = iter([100.0, 106.0])  # after step 1 (compiling) and after step 4: 2 s per step
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    estimate = callbacks.EpochTimeEstimate(steps_per_epoch=390, after_steps=3, hint="try less")
    estimate.set_params({"verbose": 2})
    with caplog.at_level("INFO", logger="nam_keras"):
        for step in range(6):
            estimate.on_train_batch_end(step)
    assert estimate.estimate_s == pytest.approx(780.0)
    assert caplog.messages == [
        "one epoch takes about 13.0 min (2.00 s/step x 390 steps); try less"
    ]  # once only
