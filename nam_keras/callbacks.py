"""Training callbacks: the warmup-cosine learning rate, the stop on a NaN
loss, crash-safe epoch backups and a clean stop on SIGTERM / Ctrl-C."""

import math
import os
import signal
import threading

import keras
import numpy as np
from keras import ops

from nam_keras import io, rundir
from nam_keras.errors import NonFiniteLossError, TrainingInterruptedError


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


@keras.saving.register_keras_serializable(package="nam_keras")
class WarmupCosine(keras.callbacks.Callback):
    """Sets the optimizer's learning rate before every training step.

    The rate is computed from the optimizer's own iteration count, so it is
    exact after a run resumes from a backup (or any reload of the optimizer
    state). The value is added to the epoch logs as `lr`, so that
    `History`, `CSVLogger` and `TensorBoard` placed after this callback record it.

    Args:
        base_lr: peak learning rate, reached at the end of the warmup.
        total_steps: number of optimizer steps of the whole run.
        warmup_steps: length of the linear warmup from 0. Defaults to 2000.
    """

    def __init__(self, base_lr, total_steps, warmup_steps=2000):
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1; received {total_steps}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; received {warmup_steps}.")
        if base_lr < 0:
            raise ValueError(f"base_lr must be >= 0; received {base_lr}.")
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def lr_at(self, step):
        return warmup_cosine(step, self.base_lr, self.warmup_steps, self.total_steps)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self.model.optimizer.learning_rate = self.lr_at(step)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


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
