"""The learning-rate schedules against transcriptions of Paddle and PyTorch, the NAM
sparsity and speed figures, and the stops on a non-finite loss and on signals."""

import json
import math

import keras
import numpy as np
import pytest

from nam_keras.errors import NonFiniteLossError
from nam_keras.training import callbacks, schedules
from nam_keras.training.optimizers import TorchSGD


def test_warmup_cosine_values():
    f = lambda s: schedules.warmup_cosine(s, 0.1, 2000, 10001)
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
    callback = schedules.WarmupCosine(0.1, total_steps=10001, warmup_steps=2000)
    callback.set_model(model)
    model.optimizer.iterations.assign(6000)  # as a resume from a backup restores it
    callback.on_train_batch_begin(0)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs["lr"] == pytest.approx(0.05)
    clone = schedules.WarmupCosine.from_config(json.loads(json.dumps(callback.get_config())))
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


def paddle_seed_schedule(lr, warmup, t_max, steps_per_epoch, epochs):
    """The seed's stepping, transcribed: LinearWarmup(CosineAnnealingDecay(lr,
    t_max), warmup) stepped after every batch while warming up, then after
    every epoch (the write-ups' LRSchedulerM); the rate each batch used."""

    def value(last_epoch):
        if last_epoch < warmup:
            return lr * last_epoch / warmup
        return lr * (1 + math.cos(math.pi * (last_epoch - warmup) / t_max)) / 2

    # Without warmup the write-ups' callback would still step once after the
    # first batch; that quirk is not copied: warmup 0 is a plain per-epoch cosine.
    used, last_epoch, warming = [], 0, warmup > 0
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            used.append(value(last_epoch))
            if warming:
                last_epoch += 1
                warming = last_epoch < warmup
        if not warming:
            last_epoch += 1
    return used


@pytest.mark.parametrize("warmup, steps_per_epoch", [(20, 7), (21, 7), (0, 5), (14, 7)])
def test_epoch_cosine_steps_as_paddle_does(warmup, steps_per_epoch):
    epochs = 12
    want = paddle_seed_schedule(0.01, warmup, epochs, steps_per_epoch, epochs)
    got = [
        schedules.epoch_cosine(s, 0.01, warmup, steps_per_epoch, epochs)
        for s in range(steps_per_epoch * epochs)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_epoch_cosine_seed_values_by_hand():
    """Seed recipe: 2,000 warmup steps, 195 steps per epoch (batch 256), T = 300."""
    f = lambda s: schedules.epoch_cosine(s, 0.01, 2000, 195, 300)
    assert (f(0), f(1000), f(2000), f(2144)) == (0.0, 0.005, 0.01, 0.01)
    assert f(2145) == pytest.approx(0.005 * (1 + math.cos(math.pi / 300)))  # epoch 11's end
    assert f(195 * 300 - 1) == pytest.approx(0.005 * (1 + math.cos(math.pi * 289 / 300)))


def test_multistep_as_pytorch_steps_it_per_epoch():
    """MultiStepLR(milestones=[2, 4], gamma=0.2) stepped after every epoch:
    epoch e (0-based) uses 0.1 * 0.2 ** #(m <= e)."""
    f = lambda s: schedules.multistep(s, 0.1, 3, [2, 4], 0.2)
    per_epoch = [f(3 * e) for e in range(6)]
    np.testing.assert_allclose(per_epoch, [0.1, 0.1, 0.02, 0.02, 0.004, 0.004])
    assert f(5) == 0.1 and f(6) == pytest.approx(0.02)
    assert schedules.multistep(2, 0.1, 3, [2], 0.2, warmup_steps=4) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "schedule, step, want",
    [
        (schedules.MultiStep(0.1, steps_per_epoch=10, milestones=[3, 5]), 35, 0.02),
        (schedules.EpochCosine(0.1, steps_per_epoch=10, epochs=4, warmup_steps=10), 25, 0.05),
    ],
)
def test_every_schedule_is_exact_after_a_resume(schedule, step, want):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=TorchSGD(0.0), loss="mse")
    model.optimizer.build(model.trainable_variables)
    schedule.set_model(model)
    model.optimizer.iterations.assign(step)  # as a restored backup sets it
    schedule.on_train_batch_begin(0)
    assert float(model.optimizer.learning_rate) == pytest.approx(want)
    clone = type(schedule).from_config(json.loads(json.dumps(schedule.get_config())))
    assert clone.lr_at(step) == pytest.approx(want)


def test_bad_milestones_are_refused():
    with pytest.raises(ValueError, match=r"milestones must be increasing epochs >= 1"):
        schedules.MultiStep(0.1, 10, [5, 3])


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


def test_training_speed_excludes_validation(monkeypatch):
    clock = iter([10.0, 12.0])  # epoch begins at 10 s, validation begins at 12 s
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    speed = callbacks.TrainingSpeed(batch_size=32)
    speed.on_epoch_begin(0)
    for step in range(5):
        speed.on_train_batch_end(step)
    speed.on_test_begin()
    logs = {}
    speed.on_epoch_end(0, logs)  # no further clock reading: validation not counted
    assert logs["train_images_per_s"] == 5 * 32 / 2.0


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
