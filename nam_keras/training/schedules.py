"""Learning-rate schedules: warmup-cosine, the seed's per-epoch cosine, the
official multi-step."""

import math

import keras
from keras import ops


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


class StepSchedule(keras.callbacks.Callback):
    """Sets the optimizer's learning rate before every training step to `lr_at(step)`.

    The step is the optimizer's own iteration count, so the rate is exact
    after a run resumes from a backup (or any reload of the optimizer state).
    The value is added to the epoch logs as `lr`, so that `History`,
    `CSVLogger` and `TensorBoard` placed after this callback record it.
    Subclasses define `lr_at` and `get_config`.
    """

    def lr_at(self, step):
        """The learning rate of 0-based optimizer step `step`."""
        raise NotImplementedError

    def on_train_batch_begin(self, batch, logs=None):
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self.model.optimizer.learning_rate = self.lr_at(step)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _check_schedule(base_lr, warmup_steps, **positive):
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0; received {base_lr}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; received {warmup_steps}.")
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1; received {value}.")


@keras.saving.register_keras_serializable(package="nam_keras")
class WarmupCosine(StepSchedule):
    """Linear warmup from 0, then cosine decay to 0 at the last step (`warmup_cosine`).

    Args:
        base_lr: peak learning rate, reached at the end of the warmup.
        total_steps: number of optimizer steps of the whole run.
        warmup_steps: length of the linear warmup from 0. Defaults to 2000.
    """

    def __init__(self, base_lr, total_steps, warmup_steps=2000):
        super().__init__()
        _check_schedule(base_lr, warmup_steps, total_steps=total_steps)
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def lr_at(self, step):
        return warmup_cosine(step, self.base_lr, self.warmup_steps, self.total_steps)

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }


@keras.saving.register_keras_serializable(package="nam_keras")
class EpochCosine(StepSchedule):
    """The seed's schedule: linear warmup per step, cosine per epoch (`epoch_cosine`).

    Args:
        base_lr: peak learning rate.
        steps_per_epoch: optimizer steps per epoch.
        epochs: the cosine's period in epochs (Paddle's `T_max`).
        warmup_steps: length of the linear warmup from 0. Defaults to 2000.
    """

    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_steps=2000):
        super().__init__()
        _check_schedule(base_lr, warmup_steps, steps_per_epoch=steps_per_epoch, epochs=epochs)
        self.base_lr = float(base_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.warmup_steps = int(warmup_steps)

    def lr_at(self, step):
        return epoch_cosine(
            step, self.base_lr, self.warmup_steps, self.steps_per_epoch, self.epochs
        )

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "warmup_steps": self.warmup_steps,
        }


@keras.saving.register_keras_serializable(package="nam_keras")
class MultiStep(StepSchedule):
    """The official NAM code's schedule: x `decay` at each milestone epoch (`multistep`).

    Args:
        base_lr: initial learning rate.
        steps_per_epoch: optimizer steps per epoch.
        milestones: increasing 1-based epoch counts; epoch `m` (0-based) is the
            first with the lower rate, as in PyTorch.
        decay: the factor. Defaults to 0.2.
        warmup_steps: optional linear warmup from 0. Defaults to 0.
    """

    def __init__(self, base_lr, steps_per_epoch, milestones, decay=0.2, warmup_steps=0):
        super().__init__()
        _check_schedule(base_lr, warmup_steps, steps_per_epoch=steps_per_epoch)
        milestones = [int(m) for m in milestones]
        if milestones != sorted(set(milestones)) or (milestones and milestones[0] < 1):
            raise ValueError(f"milestones must be increasing epochs >= 1; received {milestones}.")
        self.base_lr = float(base_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.milestones = milestones
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)

    def lr_at(self, step):
        return multistep(
            step, self.base_lr, self.steps_per_epoch, self.milestones, self.decay, self.warmup_steps
        )

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "milestones": self.milestones,
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
        }
