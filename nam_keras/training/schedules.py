"""Learning-rate schedules: warmup-cosine, the seed's per-epoch cosine, the
official multi-step.

The maths lives in three `keras.optimizers.schedules.LearningRateSchedule`s,
`WarmupCosineDecay`, `EpochCosineDecay` and `MultiStepDecay`, written with
`keras.ops` only: the optimizer evaluates them inside the compiled training
step (TensorFlow, JAX or torch) from its own iteration count, so the rate is
exact at every step, and after a resume, with no work on the host per step (on
a GPU, reading the step count on the host every step forces a sync).

The callbacks that users name, `WarmupCosine`, `EpochCosine` and `MultiStep`,
only install their schedule: they put it on the model's optimizer when training
begins (keeping the optimizer's learning-rate variable, so that backups keep
their layout, and giving it back when training ends), and add the rate of each
epoch's last step to the epoch logs as `lr` (read by `History`, `CSVLogger` and
`TensorBoard` placed after them). They have no per-batch hooks.

The plain-Python functions `warmup_cosine`, `epoch_cosine` and `multistep` are
the float64 references the schedules are tested against.
"""

import math
import numbers

import keras
from keras import ops

from nam_keras.config import MAX_COUNT  # step counts are int32 inside the schedules


def warmup_cosine(step, base_lr, warmup_steps, total_steps):
    """Learning rate at optimizer step `step` (0-based).

    Linear warmup from 0 over `warmup_steps` steps, then cosine decay from
    `base_lr` to exactly 0 at the last step (`total_steps - 1`).
    """
    step = min(max(int(step), 0), total_steps - 1)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return 0.0
    progress = (step - warmup_steps) / decay_steps
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def epoch_cosine(step, base_lr, warmup_steps, steps_per_epoch, epochs):
    """Learning rate at step `step` of Paddle's `LinearWarmup(CosineAnnealingDecay(
    base_lr, epochs), warmup_steps)` stepped as the seed code steps it.

    The warmup is linear from 0 and stepped every batch; once it is over the
    cosine is stepped at every epoch end, so it starts at `base_lr` and has
    decayed `k` times, `k` = epoch ends reached since the warmup's last step:
    `base_lr * (1 + cos(pi * k / epochs)) / 2`. It does not reach 0: the
    warmup's epochs are not counted in the cosine.
    """
    step = max(int(step), 0)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    first_boundary = max(-(-warmup_steps // steps_per_epoch), 1)  # first epoch end >= warmup
    k = max(step // steps_per_epoch - first_boundary + 1, 0)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * k / epochs))


def multistep(step, base_lr, steps_per_epoch, milestones, decay, warmup_steps=0):
    """Learning rate at step `step` of PyTorch's `MultiStepLR` stepped per epoch:
    `base_lr * decay ** (milestones <= epoch)`, epoch = `step // steps_per_epoch`
    (0-based), after an optional linear warmup from 0."""
    step = max(int(step), 0)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    epoch = step // steps_per_epoch
    return base_lr * decay ** sum(epoch >= m for m in milestones)


def _check_rate(name, value, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; received {value!r}.")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}; received {value!r}.")
    return float(value)


def _check_count(name, value, minimum):
    """`value` as an int: a whole number in `minimum..2**31 - 1`."""
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and float(value).is_integer()
    )
    if isinstance(value, bool) or not whole:
        raise ValueError(f"{name} must be a whole number; received {value!r}.")
    if not minimum <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be in {minimum}..{MAX_COUNT}; received {value!r}.")
    return int(value)


def _step(step):
    """The 0-based step as an int32 tensor, at least 0 (floats truncated, as `int()`)."""
    return ops.maximum(ops.cast(step, "int32"), 0)


def _linear_warmup(step, base_lr, warmup_steps):
    """`base_lr * step / warmup_steps` (a step count of 0 divides by 1: never used then)."""
    dtype = keras.config.floatx()
    return ops.cast(step, dtype) * (base_lr / max(warmup_steps, 1))


def _half_cosine(base_lr, remaining, period):
    """`base_lr * (1 + cos(pi * (period - remaining) / period)) / 2`, written
    `base_lr * sin(pi/2 * remaining / period) ** 2`: the same value, accurate to
    float32's relative precision also where it nears 0 (`remaining` is an exact
    integer count; 1 + cos(x) near x = pi would lose every digit)."""
    dtype = keras.config.floatx()
    angle = ops.cast(remaining, dtype) * (math.pi / 2 / period)
    return base_lr * ops.square(ops.sin(angle))


@keras.saving.register_keras_serializable(package="nam_keras")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0, then cosine decay to exactly 0 at the last step.

    Equals `warmup_cosine` at every 0-based step (steps beyond the last give 0).

    Args:
        base_lr: peak learning rate, reached at the end of the warmup.
        total_steps: number of optimizer steps of the whole run.
        warmup_steps: length of the linear warmup from 0. Defaults to 2000.
    """

    def __init__(self, base_lr, total_steps, warmup_steps=2000):
        self.base_lr = _check_rate("base_lr", base_lr)
        self.total_steps = _check_count("total_steps", total_steps, 1)
        self.warmup_steps = _check_count("warmup_steps", warmup_steps, 0)

    def __call__(self, step):
        last = self.total_steps - 1
        step = ops.minimum(_step(step), last)
        warm = _linear_warmup(step, self.base_lr, self.warmup_steps)
        decay_steps = last - self.warmup_steps
        if decay_steps <= 0:
            decayed = ops.zeros_like(warm)
        else:
            decayed = _half_cosine(self.base_lr, last - step, decay_steps)
        return ops.where(ops.less(step, self.warmup_steps), warm, decayed)

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }


@keras.saving.register_keras_serializable(package="nam_keras")
class EpochCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """The seed's schedule: linear warmup per step, then a cosine stepped per epoch.

    Equals `epoch_cosine` at every 0-based step: after the warmup the rate is
    `base_lr * (1 + cos(pi * k / epochs)) / 2`, `k` = epoch ends reached since the
    warmup's last step (Paddle's `LinearWarmup(CosineAnnealingDecay)` as the seed
    steps it).

    Args:
        base_lr: peak learning rate.
        steps_per_epoch: optimizer steps per epoch.
        epochs: the cosine's period in epochs (Paddle's `T_max`).
        warmup_steps: length of the linear warmup from 0. Defaults to 2000.
    """

    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_steps=2000):
        self.base_lr = _check_rate("base_lr", base_lr)
        self.steps_per_epoch = _check_count("steps_per_epoch", steps_per_epoch, 1)
        self.epochs = _check_count("epochs", epochs, 1)
        self.warmup_steps = _check_count("warmup_steps", warmup_steps, 0)

    def __call__(self, step):
        step = _step(step)
        warm = _linear_warmup(step, self.base_lr, self.warmup_steps)
        first_boundary = max(-(-self.warmup_steps // self.steps_per_epoch), 1)
        k = ops.floor_divide(step, self.steps_per_epoch) - (first_boundary - 1)
        k = ops.maximum(k, 0)
        decayed = _half_cosine(self.base_lr, self.epochs - k, self.epochs)
        return ops.where(ops.less(step, self.warmup_steps), warm, decayed)

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "warmup_steps": self.warmup_steps,
        }


@keras.saving.register_keras_serializable(package="nam_keras")
class MultiStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """The official NAM code's schedule: x `decay` at each milestone epoch.

    Equals `multistep` at every 0-based step: `base_lr * decay ** n`, `n` = the
    milestones <= the 0-based epoch, after an optional linear warmup from 0.

    Args:
        base_lr: initial learning rate.
        steps_per_epoch: optimizer steps per epoch.
        milestones: increasing 1-based epoch counts; epoch `m` (0-based) is the
            first with the lower rate, as in PyTorch.
        decay: the factor. Defaults to 0.2.
        warmup_steps: optional linear warmup from 0. Defaults to 0.
    """

    def __init__(self, base_lr, steps_per_epoch, milestones, decay=0.2, warmup_steps=0):
        self.base_lr = _check_rate("base_lr", base_lr)
        self.steps_per_epoch = _check_count("steps_per_epoch", steps_per_epoch, 1)
        try:
            checked = [_check_count("milestones", m, 1) for m in milestones]
        except (TypeError, ValueError):
            checked = None
        if checked is None or checked != sorted(set(checked)):
            raise ValueError(f"milestones must be increasing epochs >= 1; received {milestones!r}.")
        self.milestones = checked
        self.decay = _check_rate("decay", decay, positive=True)
        self.warmup_steps = _check_count("warmup_steps", warmup_steps, 0)

    def __call__(self, step):
        dtype = keras.config.floatx()
        step = _step(step)
        warm = _linear_warmup(step, self.base_lr, self.warmup_steps)
        # The rates after 0, 1, ... milestones, rounded once from float64.
        rates = [self.base_lr * self.decay**n for n in range(len(self.milestones) + 1)]
        if self.milestones:
            epoch = ops.expand_dims(ops.floor_divide(step, self.steps_per_epoch), -1)
            passed = ops.greater_equal(epoch, ops.convert_to_tensor(self.milestones, "int32"))
            n = ops.sum(ops.cast(passed, "int32"), axis=-1)
            decayed = ops.take(ops.convert_to_tensor(rates, dtype), n)
        else:
            decayed = ops.full_like(warm, rates[0])
        return ops.where(ops.less(step, self.warmup_steps), warm, decayed)

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "milestones": list(self.milestones),
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
        }


def install_schedule(optimizer, schedule):
    """Puts `schedule` on `optimizer` (or on the optimizer a `LossScaleOptimizer` wraps).

    Keras' `learning_rate` setter would untrack the learning-rate variable that an
    optimizer created with a float rate holds, so the optimizer's state (what
    `save_weights` writes: a run's backups) would lose a slot, and a backup
    written after the change would not load into an optimizer made afresh, nor
    the other way round. The variable is kept, in its place, unused while the
    schedule is on.

    Returns:
        That variable, for `remove_schedule`; `None` if the optimizer had none.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    variable = optimizer._learning_rate
    if isinstance(variable, keras.Variable):
        optimizer._learning_rate = schedule  # the variable stays tracked
        return variable
    optimizer.learning_rate = schedule
    return None


def remove_schedule(optimizer, variable, value):
    """Gives `optimizer` back the learning-rate `variable` that `install_schedule`
    returned, set to `value`: the optimizer is then as it was built (what
    `model.save` writes has the same slots as before the schedule was installed)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if variable is not None:
        variable.assign(value)
        optimizer._learning_rate = variable


class ScheduleCallback(keras.callbacks.Callback):
    """Puts `self.schedule` on the model's optimizer for the time of `fit`, and
    logs the rate of each epoch's last step as `lr`.

    The optimizer evaluates the schedule inside the compiled step, from its own
    iteration count: exact at every step and after a resume, with nothing done
    on the host per step. The optimizer is best created with a float learning
    rate (e.g. 0.0), whose variable keeps its slot in the optimizer's state (so
    that backups load both ways); when training ends, that rate is put back,
    set to the last step's rate, so that the model saved after `fit` reloads
    with its optimizer state. Subclasses set `self.schedule`; their config is
    the schedule's.
    """

    schedule = None
    _variable = None

    def lr_at(self, step):
        """The learning rate of 0-based optimizer step `step`, a Python float."""
        return float(ops.convert_to_numpy(self.schedule(step)))

    def _last_lr(self):
        steps = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        return self.lr_at(max(steps - 1, 0))

    def on_train_begin(self, logs=None):
        self._variable = install_schedule(self.model.optimizer, self.schedule)
        # `fit` made (or reused) its train function before this hook: make it
        # again, so that the compiled step traces the optimizer with the schedule.
        self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = self._last_lr()

    def on_train_end(self, logs=None):
        if self._variable is not None:
            remove_schedule(self.model.optimizer, self._variable, self._last_lr())
            self._variable = None
        self.model.train_function = None  # traced with the schedule: the next `fit` retraces

    def get_config(self):
        return self.schedule.get_config()

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="nam_keras")
class WarmupCosine(ScheduleCallback):
    """Puts a `WarmupCosineDecay` on the optimizer and logs it: linear warmup from
    0, then cosine decay to 0 at the last step (`warmup_cosine`).

    Args: those of `WarmupCosineDecay` (`base_lr`, `total_steps`,
    `warmup_steps=2000`).
    """

    def __init__(self, base_lr, total_steps, warmup_steps=2000):
        super().__init__()
        self.schedule = WarmupCosineDecay(base_lr, total_steps, warmup_steps)


@keras.saving.register_keras_serializable(package="nam_keras")
class EpochCosine(ScheduleCallback):
    """Puts an `EpochCosineDecay` on the optimizer and logs it: the seed's
    schedule, linear warmup per step, cosine per epoch (`epoch_cosine`).

    Args: those of `EpochCosineDecay` (`base_lr`, `steps_per_epoch`, `epochs`,
    `warmup_steps=2000`).
    """

    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_steps=2000):
        super().__init__()
        self.schedule = EpochCosineDecay(base_lr, steps_per_epoch, epochs, warmup_steps)


@keras.saving.register_keras_serializable(package="nam_keras")
class MultiStep(ScheduleCallback):
    """Puts a `MultiStepDecay` on the optimizer and logs it: the official NAM
    code's schedule, x `decay` at each milestone epoch (`multistep`).

    Args: those of `MultiStepDecay` (`base_lr`, `steps_per_epoch`,
    `milestones`, `decay=0.2`, `warmup_steps=0`).
    """

    def __init__(self, base_lr, steps_per_epoch, milestones, decay=0.2, warmup_steps=0):
        super().__init__()
        self.schedule = MultiStepDecay(base_lr, steps_per_epoch, milestones, decay, warmup_steps)


def for_run(name, base_lr, steps_per_epoch, epochs, warmup_steps, milestones=(), decay=0.2):
    """The schedule callback that `train.py --schedule NAME` names.

    Args:
        name: a key of `BY_NAME`.
        base_lr: the peak learning rate.
        steps_per_epoch: optimizer steps per epoch.
        epochs: the run's epochs.
        warmup_steps: length of the linear warmup from 0.
        milestones: epochs of `"multistep"`'s decays.
        decay: `"multistep"`'s factor.
    """
    if name not in BY_NAME:
        raise ValueError(f"Unknown schedule {name!r}; expected one of {sorted(BY_NAME)}.")
    if name == "warmup-cosine":
        return WarmupCosine(base_lr, steps_per_epoch * epochs, warmup_steps)
    if name == "epoch-cosine":
        return EpochCosine(base_lr, steps_per_epoch, epochs, warmup_steps)
    return MultiStep(base_lr, steps_per_epoch, milestones, decay, warmup_steps)


#: `train.py --schedule` name -> its callback class.
BY_NAME = {"warmup-cosine": WarmupCosine, "epoch-cosine": EpochCosine, "multistep": MultiStep}
