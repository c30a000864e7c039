"""Training callbacks: the NAM sparsity figures, speed and epoch-time figures,
the stop on a NaN loss, crash-safe epoch backups and a clean stop on SIGTERM /
Ctrl-C. The learning-rate schedules' callbacks are in `training.schedules`."""

import logging
import signal
import threading
import time

import keras
import numpy as np

from nam_keras.errors import NonFiniteLossError, TrainingInterruptedError
from nam_keras.models.resnet import nam_weight_figures


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
        """`{"nam_near_zero": ..., "nam_max_weight": ...}`, or `{}` without NAM
        channel weights (`models.resnet.nam_weight_figures`)."""
        figures = nam_weight_figures(self.model, self.near_zero)
        if figures is None or not figures["channels"]:
            return {}
        return {
            "nam_near_zero": figures["near_zero_fraction"],
            "nam_max_weight": figures["max_relative"],
        }

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.figures())


class TrainingSpeed(keras.callbacks.Callback):
    """Adds `train_images_per_s` to every epoch's logs: training images per
    second of the epoch's training steps, validation excluded. The first epoch
    a `fit` trains compiles the training step in its first step: its figure is
    timed from the end of that step over the steps after it (all of them when
    the epoch has one step only).

    Args:
        batch_size: the global batch size.
    """

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = int(batch_size)
        self._start = self._end = None
        self._steps = 0
        self._compiled = False

    def on_train_begin(self, logs=None):
        self._compiled = False

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._end, self._steps = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        if not self._compiled and (self.params or {}).get("steps") != 1:
            self._compiled = True  # the step that compiled: timing starts after it
            self._start = time.perf_counter()
            return
        self._steps += 1

    def on_test_begin(self, logs=None):
        if self._start is not None and self._end is None:
            self._end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self._compiled = True
        seconds = (self._end or time.perf_counter()) - self._start
        if logs is not None and seconds > 0:
            logs["train_images_per_s"] = self._steps * self.batch_size / seconds


def end_progress_line(callback):
    """Ends the line of the progress bar (`fit`'s `verbose=1`), so that a message
    printed next starts on a line of its own."""
    if (callback.params or {}).get("verbose") == 1:
        print(flush=True)


class TensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` that logs the learning rate once: as `lr`
    from the epoch logs (the rate of the epoch's last step, as in `log.csv`),
    not again as Keras' `learning_rate`."""

    def _collect_learning_rate(self, logs):
        return logs


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
            end_progress_line(self)
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
            end_progress_line(self)
            raise NonFiniteLossError(
                f"the training loss became {float(loss)} at step {batch} of epoch "
                f"{self._epoch + 1}; training stopped. The last completed epoch "
                "is kept in the run directory's backup."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


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
            end_progress_line(self)
            name = signal.Signals(self.received).name
            raise TrainingInterruptedError(
                f"stopped by {name} during epoch {self._epoch + 1}; the {self._epoch} completed "
                "epoch(s) are kept in the run directory's backup. Re-run the same command to "
                "resume.",
                self.received,
            )
