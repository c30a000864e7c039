"""The learning-rate schedules: the float64 references against transcriptions of
Paddle and PyTorch; the `LearningRateSchedule`s against the references, eagerly,
compiled and inside `fit`; their serialisation; the callbacks that install them,
exact after a resume, with no per-batch hooks."""

import json
import math
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from nam_keras.training import schedules
from nam_keras.training.optimizers import TorchSGD

# float32 against the float64 references; the schedules reach ~3e-7 (relative)
# also where the rate nears 0. Exact zeros must be exact.
RTOL = 1e-6


# --- the references ---------------------------------------------------------------------


def test_warmup_cosine_values():
    f = lambda s: schedules.warmup_cosine(s, 0.1, 2000, 10001)
    assert f(0) == 0.0
    assert f(1000) == pytest.approx(0.05)
    assert f(2000) == pytest.approx(0.1)  # end of warmup = peak
    assert f(6000) == pytest.approx(0.05)  # half-way through the cosine
    assert f(2000 + 8000 // 4) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert f(10000) == pytest.approx(0.0, abs=1e-12)  # the last step
    assert f(20000) == pytest.approx(0.0, abs=1e-12)


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


# --- the LearningRateSchedules against the references ------------------------------------


def around(*points, reach=2):
    """The steps within `reach` of each point, >= 0, sorted, once each."""
    return sorted({max(p + d, 0) for p in points for d in range(-reach, reach + 1)})


SEED_EPOCHS = 300
# (schedule, its reference as a function of the step, the steps to compare at)
CASES = {
    "warmup-cosine": (
        schedules.WarmupCosineDecay(0.1, total_steps=61, warmup_steps=12),
        lambda s: schedules.warmup_cosine(s, 0.1, 12, 61),
        range(75),  # every step, the warmup's end (12), the last (60) and beyond
    ),
    "warmup-cosine-seed": (
        schedules.WarmupCosineDecay(0.1, total_steps=391 * 300, warmup_steps=2000),
        lambda s: schedules.warmup_cosine(s, 0.1, 2000, 391 * 300),
        around(0, 1000, 2000, 391 * 150, 391 * 300 - 1, 391 * 400),
    ),
    "warmup-cosine-no-warmup": (
        schedules.WarmupCosineDecay(0.05, total_steps=9, warmup_steps=0),
        lambda s: schedules.warmup_cosine(s, 0.05, 0, 9),
        range(12),
    ),
    "warmup-cosine-warmup-too-long": (
        schedules.WarmupCosineDecay(0.1, total_steps=5, warmup_steps=8),
        lambda s: schedules.warmup_cosine(s, 0.1, 8, 5),
        range(10),
    ),
    "warmup-cosine-no-decay": (
        schedules.WarmupCosineDecay(0.1, total_steps=5, warmup_steps=4),
        lambda s: schedules.warmup_cosine(s, 0.1, 4, 5),
        range(8),
    ),
    "epoch-cosine": (
        schedules.EpochCosineDecay(0.01, steps_per_epoch=7, epochs=12, warmup_steps=20),
        lambda s: schedules.epoch_cosine(s, 0.01, 20, 7, 12),
        range(7 * 14),  # every step of 14 epochs: 2 beyond the period
    ),
    "epoch-cosine-warmup-on-a-boundary": (
        schedules.EpochCosineDecay(0.01, steps_per_epoch=7, epochs=12, warmup_steps=14),
        lambda s: schedules.epoch_cosine(s, 0.01, 14, 7, 12),
        range(7 * 13),
    ),
    "epoch-cosine-no-warmup": (
        schedules.EpochCosineDecay(0.01, steps_per_epoch=5, epochs=12, warmup_steps=0),
        lambda s: schedules.epoch_cosine(s, 0.01, 0, 5, 12),
        range(5 * 13),
    ),
    "epoch-cosine-seed": (
        schedules.EpochCosineDecay(0.01, steps_per_epoch=195, epochs=SEED_EPOCHS),
        lambda s: schedules.epoch_cosine(s, 0.01, 2000, 195, SEED_EPOCHS),
        around(0, 1000, 2000, 2145, *(195 * e for e in (11, 12, 150, 299, 300, 310))),
    ),
    "multistep": (
        schedules.MultiStepDecay(0.1, steps_per_epoch=3, milestones=[2, 4], decay=0.2),
        lambda s: schedules.multistep(s, 0.1, 3, [2, 4], 0.2),
        range(3 * 7),
    ),
    "multistep-warmup": (
        schedules.MultiStepDecay(0.1, 3, [1, 3], decay=0.5, warmup_steps=4),
        lambda s: schedules.multistep(s, 0.1, 3, [1, 3], 0.5, 4),
        range(3 * 5),
    ),
    "multistep-no-milestones": (
        schedules.MultiStepDecay(0.1, 3, []),
        lambda s: schedules.multistep(s, 0.1, 3, [], 0.2),
        range(7),
    ),
    "multistep-official": (
        schedules.MultiStepDecay(0.1, 391, [60, 120, 160], decay=0.2),
        lambda s: schedules.multistep(s, 0.1, 391, [60, 120, 160], 0.2),
        around(0, *(391 * e for e in (60, 120, 160, 200))),
    ),
}


def expected(name):
    schedule, reference, steps = CASES[name]
    steps = np.asarray(list(steps))
    return schedule, steps, np.array([reference(int(s)) for s in steps])


def assert_matches(got, want):
    got = np.asarray(got, "float64")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
    np.testing.assert_array_equal(got == 0, want == 0)  # zeros exactly, and only there


def compiled(fn):
    """`fn` compiled by the backend: a TensorFlow graph (XLA too), a JAX jit."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        graph = tf.function(lambda x: fn(x))
        xla = tf.function(lambda x: fn(x), jit_compile=True)
        return lambda x: (graph(x), xla(x))
    if backend == "jax":
        import jax

        jitted = jax.jit(lambda x: fn(x))
        return lambda x: (jitted(x),)
    pytest.skip(f"no compiled function here for the {backend} backend")


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_equals_its_reference_eagerly(name):
    schedule, steps, want = expected(name)
    scalars = [float(ops.convert_to_numpy(schedule(int(s)))) for s in steps]
    assert_matches(scalars, want)
    assert_matches(ops.convert_to_numpy(schedule(steps.astype("int32"))), want)
    assert np.asarray(ops.convert_to_numpy(schedule(3))).dtype == np.float32


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_equals_its_reference_compiled(name):
    schedule, steps, want = expected(name)
    for got in compiled(schedule)(ops.convert_to_tensor(steps, "int32")):
        assert_matches(ops.convert_to_numpy(got), want)


def test_a_step_given_as_a_float_is_truncated_as_int_does():
    schedule, reference = CASES["multistep-warmup"][:2]
    for step in (0.0, 2.5, 3.99, 7.0, -1.5):
        assert float(schedule(step)) == pytest.approx(reference(step), rel=RTOL)


# --- serialisation ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["warmup-cosine", "epoch-cosine", "multistep-warmup"])
def test_schedule_config_round_trips(name):
    schedule, steps, want = expected(name)
    config = schedule.get_config()
    clone = type(schedule).from_config(json.loads(json.dumps(config)))
    assert clone.get_config() == config
    assert_matches(ops.convert_to_numpy(clone(steps.astype("int32"))), want)
    serialized = keras.saving.serialize_keras_object(schedule)
    assert serialized["registered_name"] == f"nam_keras>{type(schedule).__name__}"
    revived = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(revived) is type(schedule) and revived.get_config() == config


def test_get_config_holds_every_constructor_argument():
    import inspect

    for instance in (
        schedules.WarmupCosineDecay(0.1, 40),
        schedules.EpochCosineDecay(0.1, 4, 10),
        schedules.MultiStepDecay(0.1, 4, [2]),
        schedules.WarmupCosine(0.1, 40),
        schedules.EpochCosine(0.1, 4, 10),
        schedules.MultiStep(0.1, 4, [2]),
    ):
        args = list(inspect.signature(type(instance)).parameters)
        assert list(instance.get_config()) == args, type(instance).__name__


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: schedules.WarmupCosineDecay(-0.1, 10), r"base_lr must be >= 0; received -0.1"),
        (lambda: schedules.WarmupCosineDecay(math.nan, 10), r"base_lr must be a finite.*nan"),
        (lambda: schedules.WarmupCosineDecay("0.1", 10), r"base_lr must be a finite.*'0.1'"),
        (lambda: schedules.WarmupCosineDecay(0.1, 0), r"total_steps must be in 1\.\..*received 0"),
        (lambda: schedules.WarmupCosineDecay(0.1, 10.5), r"total_steps must be a whole.*10.5"),
        (lambda: schedules.WarmupCosineDecay(0.1, 10, -1), r"warmup_steps must be in 0\.\..*-1"),
        (lambda: schedules.WarmupCosineDecay(0.1, 2**31), r"received 2147483648"),
        (lambda: schedules.EpochCosineDecay(0.1, 0, 10), r"steps_per_epoch must be .*received 0"),
        (lambda: schedules.EpochCosineDecay(0.1, 10, 0), r"epochs must be in 1\.\..*received 0"),
        (lambda: schedules.MultiStepDecay(0.1, 10, [5, 3]), r"increasing .*received \[5, 3\]"),
        (lambda: schedules.MultiStepDecay(0.1, 10, [0, 3]), r"epochs >= 1; received \[0, 3\]"),
        (lambda: schedules.MultiStepDecay(0.1, 10, [2, 2]), r"received \[2, 2\]"),
        (lambda: schedules.MultiStepDecay(0.1, 10, [2], decay=0), r"decay must be > 0; rec.* 0"),
        (lambda: schedules.WarmupCosine(0.1, 0), r"total_steps must be in 1\.\..*received 0"),
        (lambda: schedules.MultiStep(0.1, 10, [5, 3]), r"milestones must be increasing epochs"),
    ],
)
def test_bad_arguments_are_refused_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_whole_numbers_of_other_types_are_taken():
    schedule = schedules.MultiStepDecay(np.float64(0.1), np.int64(3), (2.0, np.int32(4)), 0.2)
    config = schedule.get_config()
    assert config == schedules.MultiStepDecay(0.1, 3, [2, 4]).get_config()
    assert json.loads(json.dumps(config)) == config


def tiny_model(optimizer):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def test_a_model_saved_with_a_schedule_reloads_with_it(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 2)).astype("float32"), rng.normal(size=(8, 1)).astype("float32")
    schedule = schedules.MultiStepDecay(0.1, 2, [1, 2], decay=0.5, warmup_steps=1)
    model = tiny_model(TorchSGD(learning_rate=schedule, momentum=0.9))
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)  # 4 steps: epoch 2 of the schedule
    model.save(tmp_path / "m.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Keras skipping the optimizer's variables
        loaded = keras.models.load_model(tmp_path / "m.keras")
    config = loaded.optimizer.get_config()["learning_rate"]
    assert config == keras.saving.serialize_keras_object(schedule)
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 4
    assert float(loaded.optimizer.learning_rate) == pytest.approx(0.025, rel=RTOL)


# --- the callbacks ------------------------------------------------------------------------


def test_callbacks_have_no_per_batch_hooks():
    """A host-side hook every step forces a device sync on GPUs: the schedule runs
    in the compiled step, the callbacks act once per fit and once per epoch."""
    base = keras.callbacks.Callback
    hooks = [h for h in vars(base) if h.startswith(("on_train_batch", "on_batch"))]
    assert len(hooks) == 4
    for cls in (
        schedules.ScheduleCallback,
        schedules.WarmupCosine,
        schedules.EpochCosine,
        schedules.MultiStep,
    ):
        for hook in hooks:
            assert getattr(cls, hook) is getattr(base, hook), f"{cls.__name__}.{hook}"


def optimizer_paths(model):
    return [v.path for v in model.optimizer.variables]


def test_callback_installs_the_schedule_the_optimizer_evaluates_at_its_step():
    model = tiny_model(TorchSGD(0.0))
    model.optimizer.build(model.trainable_variables)
    paths = optimizer_paths(model)
    callback = schedules.WarmupCosine(0.1, total_steps=10001, warmup_steps=2000)
    callback.set_model(model)
    callback.on_train_begin()
    assert model.optimizer.get_config()["learning_rate"]["class_name"] == "WarmupCosineDecay"
    assert optimizer_paths(model) == paths  # the learning-rate variable keeps its slot
    model.optimizer.iterations.assign(6000)  # as a resume from a backup restores it
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05, rel=RTOL)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs["lr"] == pytest.approx(schedules.warmup_cosine(5999, 0.1, 2000, 10001), RTOL)
    assert isinstance(logs["lr"], float) and callback.lr_at(2000) == pytest.approx(0.1)
    callback.on_train_end()  # the float rate is back, at the last step's value
    assert model.optimizer.get_config()["learning_rate"] == pytest.approx(logs["lr"], rel=RTOL)
    assert optimizer_paths(model) == paths
    clone = schedules.WarmupCosine.from_config(json.loads(json.dumps(callback.get_config())))
    assert clone.get_config() == {"base_lr": 0.1, "total_steps": 10001, "warmup_steps": 2000}


def test_callback_installs_into_a_loss_scale_optimizer():
    optimizer = keras.optimizers.LossScaleOptimizer(TorchSGD(0.0))
    model = tiny_model(optimizer)
    callback = schedules.MultiStep(0.1, steps_per_epoch=10, milestones=[3, 5])
    callback.set_model(model)
    callback.on_train_begin()
    model.optimizer.iterations.assign(35)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.02, rel=RTOL)


def lr_of_compiled_steps(callback, epochs, steps_per_epoch):
    """The rate each compiled step used: w' = w - lr with a gradient of 1 (plain
    SGD, a bias-free Dense(1) on ones, loss = its output)."""
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.compile(optimizer=TorchSGD(0.0, momentum=0.0, l2=0.0), loss=lambda y, p: ops.mean(p))
    kernels, installed = [0.0], []

    def after_step(batch, logs):
        if hasattr(model, "jax_state_sync"):
            model.jax_state_sync()  # JAX keeps the state outside the variables while fitting
        kernels.append(float(ops.convert_to_numpy(model.trainable_variables[0])[0, 0]))

    def at_epoch_end(epoch, logs):
        installed.append(model.optimizer.get_config()["learning_rate"]["class_name"])

    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=after_step, on_epoch_end=at_epoch_end
    )
    ones = np.ones((steps_per_epoch, 1), "float32")
    history = model.fit(
        ones, ones, batch_size=1, epochs=epochs, verbose=0, callbacks=[callback, record]
    )
    return -np.diff(kernels), history.history["lr"], installed


@pytest.mark.parametrize(
    "callback, reference",
    [
        (
            schedules.WarmupCosine(0.1, total_steps=12, warmup_steps=4),
            lambda s: schedules.warmup_cosine(s, 0.1, 4, 12),
        ),
        (
            schedules.EpochCosine(0.1, steps_per_epoch=3, epochs=4, warmup_steps=4),
            lambda s: schedules.epoch_cosine(s, 0.1, 4, 3, 4),
        ),
        (
            schedules.MultiStep(0.1, 3, milestones=[1, 3], decay=0.5, warmup_steps=2),
            lambda s: schedules.multistep(s, 0.1, 3, [1, 3], 0.5, 2),
        ),
    ],
    ids=["warmup-cosine", "epoch-cosine", "multistep"],
)
def test_the_compiled_step_uses_the_schedule_and_the_epochs_log_it(callback, reference):
    epochs, steps = 4, 3
    used, logged, installed = lr_of_compiled_steps(callback, epochs, steps)
    want = np.array([reference(s) for s in range(epochs * steps)])
    np.testing.assert_allclose(used, want, rtol=0, atol=2e-7)  # float32 kernel differences
    last_steps = [reference((e + 1) * steps - 1) for e in range(epochs)]
    np.testing.assert_allclose(logged, last_steps, rtol=RTOL)
    assert installed == [type(callback.schedule).__name__] * epochs


def lr_per_step_of(model, initial_epoch, epochs, callback, x, y, after_epoch=None):
    """Fits and returns the learning rate of every step, read by the test from
    the optimizer (host work per step that the callbacks do not do)."""
    lrs = []

    def before_step(batch, logs):
        lrs.append(float(ops.convert_to_numpy(model.optimizer.learning_rate)))

    def after_step(batch, logs):
        if hasattr(model, "jax_state_sync"):
            model.jax_state_sync()

    hooks = keras.callbacks.LambdaCallback(
        on_train_batch_begin=before_step, on_train_batch_end=after_step, on_epoch_end=after_epoch
    )
    model.fit(
        x,
        y,
        batch_size=2,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=[callback, hooks],
    )
    return lrs


def sgd_model(weights=None):
    model = tiny_model(TorchSGD(learning_rate=0.0, momentum=0.9))
    if weights is not None:
        model.set_weights(weights)
    return model


@pytest.mark.parametrize(
    "make, reference",
    [
        (
            lambda: schedules.WarmupCosine(0.1, total_steps=6, warmup_steps=2),
            lambda s: schedules.warmup_cosine(s, 0.1, 2, 6),
        ),
        (
            lambda: schedules.EpochCosine(0.1, steps_per_epoch=3, epochs=2, warmup_steps=2),
            lambda s: schedules.epoch_cosine(s, 0.1, 2, 3, 2),
        ),
        (
            lambda: schedules.MultiStep(0.1, 3, milestones=[1], decay=0.5, warmup_steps=2),
            lambda s: schedules.multistep(s, 0.1, 3, [1], 0.5, 2),
        ),
    ],
    ids=["warmup-cosine", "epoch-cosine", "multistep"],
)
def test_exact_after_a_resume(tmp_path, make, reference):
    """2 epochs x 3 steps straight, against 1 epoch, a backup written at its end
    (weights and optimizer state, as `EpochBackup` writes it), a fresh model and
    optimizer loading it, and epoch 2: the same rates, the reference's, and the
    same weights."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 2)).astype("float32"), rng.normal(size=(6, 1)).astype("float32")
    straight = sgd_model()
    initial = straight.get_weights()
    straight_lrs = lr_per_step_of(straight, 0, 2, make(), x, y)

    first = sgd_model(initial)
    backup = str(tmp_path / "epoch-1.weights.h5")
    save = lambda epoch, logs: first.save_weights(backup)
    first_lrs = lr_per_step_of(first, 0, 1, make(), x, y, save)
    resumed = sgd_model()
    resumed.optimizer.build(resumed.trainable_variables)  # as run_directory.restore does
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras warns when it skips the optimizer's state
        resumed.load_weights(backup)
    assert int(ops.convert_to_numpy(resumed.optimizer.iterations)) == 3
    resumed_lrs = lr_per_step_of(resumed, 1, 2, make(), x, y)

    assert first_lrs + resumed_lrs == straight_lrs
    np.testing.assert_allclose(straight_lrs, [reference(s) for s in range(6)], rtol=RTOL)
    assert len(set(straight_lrs)) >= 3  # the rate changes: a schedule that did nothing fails
    for got, want in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_model_trained_with_the_callback_saves_and_reloads_its_optimizer(tmp_path):
    """The float rate is back after `fit`: `nam.keras` keeps the optimizer's layout."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 2)).astype("float32"), rng.normal(size=(6, 1)).astype("float32")
    model = sgd_model()
    callback = schedules.WarmupCosine(0.1, total_steps=7, warmup_steps=2)
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[callback])
    last_lr = schedules.warmup_cosine(5, 0.1, 2, 7)
    assert model.optimizer.get_config()["learning_rate"] == pytest.approx(last_lr, rel=RTOL)
    model.save(tmp_path / "m.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras.models.load_model(tmp_path / "m.keras")
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 6
    for got, want in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(want))


def test_each_fit_trains_with_its_own_schedule():
    """`fit` compiles its step before the callbacks begin: the callback makes it
    again, and the next `fit` does not keep a schedule it was not given."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 2)).astype("float32"), rng.normal(size=(8, 1)).astype("float32")
    model = sgd_model()
    fit = lambda *callbacks: model.fit(x, y, batch_size=8, verbose=0, callbacks=list(callbacks))
    fit()  # the plain optimizer: LR 0, nothing moves
    before = [w.copy() for w in model.get_weights()]
    fit(schedules.MultiStep(0.1, 1, milestones=[5]))  # LR 0.1 for this fit
    after = model.get_weights()
    assert not np.allclose(before[0], after[0])
    fit(schedules.MultiStep(0.0, 1, milestones=[5]))  # LR 0: nothing moves
    np.testing.assert_array_equal(after[0], model.get_weights()[0])
    fit()  # no schedule any more: the optimizer's float rate (the last step's, 0)
    np.testing.assert_array_equal(after[0], model.get_weights()[0])
