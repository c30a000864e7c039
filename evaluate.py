"""Evaluate a trained model on the CIFAR-100 test set, report on NAM, export for TF Serving.

python evaluate.py nam.keras                        # loss, top-1/top-5, worst classes, NAM report
python evaluate.py nam.keras --json report.json --plots plots/
python evaluate.py nam.keras --export export/nam    # SavedModel in export/nam/<next version>/
python evaluate.py export/nam/1                     # what it exported: SavedModel, .tflite, .onnx
"""

import sys

from nam_keras import cli  # (importing nam_keras quiets TensorFlow's start: nam_keras.console)
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
