"""A quiet start for the command lines: TensorFlow's start-up noise held back.

Standard library only: `nam_keras/__init__.py` uses it around its first import
of Keras (which imports TensorFlow) when `train.py` / `evaluate.py` ask for it
through the environment variable `NAM_KERAS_QUIET_START=1`.
"""

import contextlib
import os
import re
import sys
import tempfile

#: Set to "1" by `train.py` / `evaluate.py` before they import `nam_keras`, unless
#: the user set TF_CPP_MIN_LOG_LEVEL (then TensorFlow's own logging is what they want).
QUIET_START = "NAM_KERAS_QUIET_START"

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
