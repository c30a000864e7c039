"""Evaluate a trained model on the CIFAR-100 test set, report on NAM, export for TF Serving.

python evaluate.py nam.keras                        # loss, top-1/top-5, worst classes, NAM report
python evaluate.py nam.keras --json report.json --plots plots/
python evaluate.py nam.keras --export export/nam    # SavedModel in export/nam/<next version>/
"""

import os
import sys

if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:  # set: the user wants TensorFlow's own logging
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # errors only
    os.environ["NAM_KERAS_QUIET_START"] = "1"  # and no start-up noise (nam_keras.console)

from nam_keras import cli
from nam_keras.config import EvalConfig

PROG = "evaluate.py"


def main(argv=None):
    """`evaluate.py` with `argv` (default `sys.argv[1:]`); returns the exit code."""
    config = cli.parse_config(EvalConfig, argv, PROG, __doc__.split("\n\n")[0])
    cli.start_quietly()
    from nam_keras.reports import evaluation

    return cli.run_main(PROG, evaluation.evaluate, config)


if __name__ == "__main__":
    sys.exit(main())
