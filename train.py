"""Train the NAM ResNet (or the plain baseline, or SE/CBAM/BAM) on CIFAR-100.

    python train.py --nam --epochs 300          # writes nam.keras
    python train.py --baseline --epochs 300     # writes baseline.keras
    python train.py --attention cbam --recipe official   # writes cbam.keras
    python train.py --dataset synthetic --depth 18 --width 8 --epochs 1 --steps-per-epoch 2

Re-running the same command after a crash resumes from the last completed epoch
(the run directory's backup/); --no-resume starts afresh.
"""

import os
import sys

if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:  # set: the user wants TensorFlow's own logging
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # errors only
    os.environ["NAM_KERAS_QUIET_START"] = "1"  # and no start-up noise (nam_keras.console)

from nam_keras import cli
from nam_keras.config import TrainConfig

PROG = "train.py"


def build_parser():
    """The `train.py` argument parser (derived from `TrainConfig`)."""
    return cli.build_parser(TrainConfig, PROG, __doc__.split("\n\n")[0])


def main(argv=None):
    """`train.py` with `argv` (default `sys.argv[1:]`); returns the exit code."""
    config = cli.parse_config(TrainConfig, argv, PROG, __doc__.split("\n\n")[0])
    return cli.run_main(PROG, _start_and_train, config)


def _start_and_train(config):
    """The devices started quietly (a cluster joined), then the run."""
    cli.start_quietly(config.cpu_replicas, config.cluster_timeout)
    from nam_keras.training.experiment import train

    return train(config)


if __name__ == "__main__":
    sys.exit(main())
