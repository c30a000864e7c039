"""A quiet, orderly console: TensorFlow's start-up noise held back, our
warnings on one line.

Standard library only: `nam_keras/__init__.py` calls `quiet_by_default` and
`tidy_python_messages` before its first import of Keras (which imports
TensorFlow), so every entry point (`train.py`, `evaluate.py`, `python -m
nam_keras.reports.compare`, `python -m nam_keras.serving.client`, `import
nam_keras`) starts the same way.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings

#: "1" while the start is quiet: set with TF_CPP_MIN_LOG_LEVEL by `quiet_by_default`
#: (child processes inherit both), unless the user set TF_CPP_MIN_LOG_LEVEL (then
#: TensorFlow's own logging is what they want).
QUIET_START = "NAM_KERAS_QUIET_START"
#: TensorFlow's C++ log level of a quiet start: errors only (its notes are level 0).
QUIET_TF_LOG_LEVEL = "2"

#: Python log records dropped (logger name -> pattern): TFDS' note about a folder it
#: has not prepared yet, which says nothing the data source does not say better.
LOG_NOISE = {"absl": re.compile(r"has no dataset_info\.json")}

#: The folder whose code's warnings print on one line (`one_line_warnings`).
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

#: What TensorFlow's C++ side prints at start that says nothing to a user: absl's
#: preamble, oneDNN and CPU-feature notes, and CUDA's probing on a machine without
#: a GPU (the tensorflow[and-cuda] wheels). Everything else is shown.
STARTUP_NOISE = tuple(
    re.compile(p)
    for p in (
        r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
        r"oneDNN custom operations are on",
        r"cpu_feature_guard|This TensorFlow binary is optimized|^To enable the following",
        r"failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory",
        r"computation placer already registered|Could not find cuda drivers",
        r"TF-TRT Warning: Could not find TensorRT",
        r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU",
    )
)


@contextlib.contextmanager
def quiet_startup(noise=STARTUP_NOISE, enabled=True):
    """Holds back what is written to the process' stderr (file descriptor 2,
    so TensorFlow's C++ logging too) and, when the block ends, writes it out
    without the lines matching `noise`. Errors and warnings stay visible.

    Args:
        noise: compiled patterns of the lines to drop.
        enabled: `False` changes nothing.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [
                line
                for line in held.read().decode(errors="replace").splitlines()
                if not any(p.search(line) for p in noise)
            ]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def quietly():
    """`quiet_startup`, enabled when the start is quiet (`QUIET_START` is "1")."""
    return quiet_startup(enabled=os.environ.get(QUIET_START) == "1")


def quiet_by_default():
    """Unless the user set TF_CPP_MIN_LOG_LEVEL: sets it to `QUIET_TF_LOG_LEVEL`
    and `QUIET_START` to "1" (before TensorFlow is imported, or it is too late).
    Returns whether the start is quiet."""
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_TF_LOG_LEVEL
        os.environ[QUIET_START] = "1"
    return os.environ.get(QUIET_START) == "1"


class _DropNoise(logging.Filter):
    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record):
        return not self.pattern.search(record.getMessage())


def one_line_warnings(format_warning=warnings.formatwarning):
    """A `warnings.formatwarning` that writes the warnings raised from this
    package's code as `[nam-keras] warning: message` (no file, no source line)
    and hands the others to `format_warning`."""

    def formatwarning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep):
            return f"[nam-keras] warning: {message}\n"
        return format_warning(message, category, filename, lineno, line)

    formatwarning.nam_keras = True
    return formatwarning


def tidy_python_messages():
    """Drops the `LOG_NOISE` records and prints our warnings on one line
    (`one_line_warnings`). Idempotent."""
    for name, pattern in LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(pattern))
    if not getattr(warnings.formatwarning, "nam_keras", False):
        warnings.formatwarning = one_line_warnings(warnings.formatwarning)
