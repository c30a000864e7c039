"""Training callbacks: the learning-rate schedules (warmup-cosine, the seed's
per-epoch cosine, the official multi-step), the NAM sparsity figures, the
stop on a NaN loss, crash-safe epoch backups and a clean stop on SIGTERM / Ctrl-C."""

import logging
import math
import os
import signal
import threading
import time

import keras
import numpy as np
from keras import ops

from nam_keras import io, rundir
from nam_keras.errors import NonFiniteLossError, TrainingInterruptedError
from nam_keras.resnet import nam_layers


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


class NAMSparsity(keras.callbacks.Callback):
    """Adds the NAM sparsity figures to every epoch's logs, so that `log.csv`
    and TensorBoard (placed after this callback) show the L1 penalty at work.

    - `nam_near_zero`: the fraction of all NAM channels whose weight
      `|gamma_c| / sum |gamma|` is below `near_zero` times the uniform `1 / C`;
    - `nam_max_weight`: the largest weight relative to uniform (`max_c w_c * C`,
      over every NAM layer): 1.0 at initialisation, larger as weights peak.

    Does nothing on a model without NAM.

    Args:
        near_zero: the threshold, as a fraction of the uniform weight. Defaults to 0.1.
    """

    def __init__(self, near_zero=0.1):
        super().__init__()
        if not 0 < near_zero <= 1:
            raise ValueError(f"near_zero must be in (0, 1]; received {near_zero}.")
        self.near_zero = float(near_zero)

    def figures(self):
        """`{"nam_near_zero": ..., "nam_max_weight": ...}`, or `{}` without NAM."""
        relative = [
            np.asarray(w, np.float64) * w.size
            for layer in nam_layers(self.model)
            for w in [layer.attention_weights().get("channel")]
            if w is not None
        ]
        if not relative:
            return {}
        every = np.concatenate(relative)
        return {
            "nam_near_zero": float((every < self.near_zero).mean()),
            "nam_max_weight": float(every.max()),
        }

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.figures())


class TrainingSpeed(keras.callbacks.Callback):
    """Adds `train_images_per_s` to every epoch's logs: training images per
    second of the epoch's training steps (validation excluded; the first
    epoch includes the compilation).

    Args:
        batch_size: the global batch size.
    """

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = int(batch_size)
        self._start = self._end = None
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._end, self._steps = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_test_begin(self, logs=None):
        if self._start is not None and self._end is None:
            self._end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = (self._end or time.perf_counter()) - self._start
        if logs is not None and seconds > 0:
            logs["train_images_per_s"] = self._steps * self.batch_size / seconds


def _duration(seconds):
    """`42 s`, `3.5 min` or `2.1 h`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class EpochTimeEstimate(keras.callbacks.Callback):
    """Logs, early in the first epoch this run trains, how long one epoch will
    take: the time per step measured over steps 2 to `after_steps + 1` (the
    first step compiles), times the steps per epoch, and an optional `hint`.

    Args:
        steps_per_epoch: optimizer steps per epoch.
        after_steps: how many steps to time. Defaults to 3.
        hint: an extra sentence, e.g. a pointer at a smaller network.
    """

    def __init__(self, steps_per_epoch, after_steps=3, hint=None):
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.after_steps = int(after_steps)
        self.hint = hint
        self.estimate_s = None
        self._start = None
        self._seen = 0

    def on_train_batch_end(self, batch, logs=None):
        if self.estimate_s is not None:
            return
        self._seen += 1
        if self._seen == 1:
            self._start = time.perf_counter()
        elif self._seen == self.after_steps + 1 or self._seen == self.steps_per_epoch:
            per_step = (time.perf_counter() - self._start) / (self._seen - 1)
            self.estimate_s = per_step * self.steps_per_epoch
            text = f"one epoch takes about {_duration(self.estimate_s)} ({per_step:.2f} s/step x "
            text += f"{self.steps_per_epoch} steps)"
            if self.params.get("verbose") == 1:
                print(flush=True)  # end the progress bar's line
            logging.getLogger("nam_keras").info(text + (f"; {self.hint}" if self.hint else ""))


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises `NonFiniteLossError` as soon as the loss is not finite.

    Unlike `keras.callbacks.TerminateOnNaN`, which lets the epoch end (so a
    backup callback placed after it saves the broken weights), raising ends
    `fit` at once: the last good backup stays on disk.
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"the training loss became {float(loss)} at step {batch} of epoch "
                f"{self._epoch + 1}; training stopped. The last completed epoch "
                "is kept in the run directory's backup."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


class EpochBackup(keras.callbacks.Callback):
    """Writes the model's weights and optimizer state after every epoch, whole or not at all.

    Each backup goes to a temporary file renamed to
    `backup_dir/epoch-NNNNN.weights.h5` (NNNNN = completed epochs), so a kill at
    any moment leaves the previous backups intact and weights and epoch can
    never disagree. The newest `keep` backups are kept. `nam_keras.rundir.restore`
    reads them back.

    Args:
        backup_dir: the folder of the backups (created when missing).
        keep: how many backups to keep. Defaults to 2 (the newest may be lost
            to a full disk; the one before survives).
    """

    def __init__(self, backup_dir, keep=2):
        super().__init__()
        if keep < 1:
            raise ValueError(f"keep must be >= 1; received {keep}.")
        self.backup_dir = os.fspath(backup_dir)
        self.keep = int(keep)

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.backup_dir, exist_ok=True)
        with io.atomic_path(
            rundir.backup_path(self.backup_dir, epoch + 1), suffix=".weights.h5"
        ) as tmp:
            self.model.save_weights(tmp)
        rundir.remove_backups(self.backup_dir, keep=self.keep)


class StopOnSignal(keras.callbacks.Callback):
    """Turns SIGTERM (what schedulers and `kill` send) and Ctrl-C into a clean
    stop at the end of the current training step.

    The handlers only set a flag, so a backup being written is never cut in
    half; the next step's end raises `TrainingInterruptedError`, and the last
    completed epoch's backup stays in place. A second Ctrl-C interrupts at once.
    The previous handlers are restored when training ends.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        super().__init__()
        self.received = None
        self._previous = {}
        self._epoch = 0

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_begin(self, logs=None):
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set in the main thread
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, logs=None):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.received is not None:
            self.on_train_end()
            name = signal.Signals(self.received).name
            raise TrainingInterruptedError(
                f"stopped by {name} during epoch {self._epoch + 1}; the {self._epoch} completed "
                "epoch(s) are kept in the run directory's backup. Re-run the same command to "
                "resume.",
                self.received,
            )
