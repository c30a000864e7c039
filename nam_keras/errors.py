"""The errors that nam-keras raises for a user's mistake or a broken input.

The command lines (`train.py`, `evaluate.py`) turn these into a one-line
message and an exit code; everything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """A run was asked for something that cannot work (bad settings, paths, resume)."""


class DataError(ValueError):
    """The data source is missing, unreachable, unsafe or not CIFAR-100 shaped."""


class ModelError(ValueError):
    """A file is not a usable CIFAR-100 Keras model, or an export path is wrong."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterruptedError(RuntimeError):
    """SIGTERM or Ctrl-C stopped training; the last completed epoch is kept.

    Attributes:
        signum: the signal's number (the exit code is `128 + signum`).
    """

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum
