"""Train the NAM ResNet (or the plain baseline) on CIFAR-100.

    python train.py --nam --epochs 300          # writes nam.keras
    python train.py --baseline --epochs 300     # writes baseline.keras
    python train.py --dataset synthetic --depth 18 --width 8 --epochs 1 --steps-per-epoch 2

Re-running the same command after a crash resumes from the last completed epoch
(the run directory's backup/); --no-resume starts afresh.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {value}")
    return value


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, received {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, received {value}")
    return value


def build_parser():
    from nam_keras import RESNET_CONFIGS
    from nam_keras.trainer import add_data_arguments

    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--nam", action="store_true", help="ResNet with NAM in every block (the default)")
    kind.add_argument("--baseline", action="store_true", help="the same ResNet without NAM")

    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, choices=sorted(RESNET_CONFIGS), default=50, help="ResNet depth")
    m.add_argument("--width", type=positive_int, default=64,
                   help="channels of the first stage (64 = the paper's ResNet; smaller for smoke runs)")
    m.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar",
                   help="cifar: 3x3 conv, no pooling; imagenet: 7x7/2 conv + max-pool")
    m.add_argument("--spatial", action="store_true", help="add NAM pixel attention after the channel one")
    m.add_argument("--sparsity", type=non_negative_float, default=1e-4,
                   help="weight p of the L1 penalty on the NAM BN scales (0 disables)")
    m.add_argument("--stop-gradient", action="store_true",
                   help="no gradient through the NAM weights (official PyTorch behaviour)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=positive_int, default=300, help="number of epochs")
    o.add_argument("--batch-size", type=positive_int, default=128,
                   help="global batch size (split across replicas)")
    o.add_argument("--lr", type=non_negative_float, default=0.1, help="peak learning rate for batch 128")
    o.add_argument("--lr-scaling", choices=("linear", "none"), default="linear",
                   help="linear: peak LR = --lr * batch / 128; none: peak LR = --lr")
    o.add_argument("--warmup-steps", type=int, default=2000,
                   help="linear warmup steps from 0 before the cosine decay")
    o.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=non_negative_float, default=5e-4,
                   help="L2 added to the gradient (PyTorch/Paddle semantics)")
    o.add_argument("--steps-per-epoch", type=positive_int,
                   help="steps per epoch (default: train examples // batch); caps smoke runs")
    o.add_argument("--no-augment", action="store_true", help="turn the reference augmentation off")
    o.add_argument("--randaugment", action="store_true", help="add keras.layers.RandAugment")
    o.add_argument("--mixup", type=non_negative_float, default=0.0, help="MixUp alpha (0: off)")
    o.add_argument("--cutmix", type=non_negative_float, default=0.0, help="CutMix alpha (0: off)")
    o.add_argument("--val-freq", type=int, default=1,
                   help="validate on the test split every N epochs (0: never)")
    o.add_argument("--val-steps", type=positive_int, help="cap on validation batches")
    o.add_argument("--seed", type=int, default=0, help="seed of the weights, the shuffling and the augmentation")

    d = p.add_argument_group("devices")
    d.add_argument("--precision", choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"),
                   default="auto",
                   help="auto: mixed_bfloat16 on Ampere+ GPUs and bf16-capable CPUs, "
                        "mixed_float16 on older GPUs, else float32")
    d.add_argument("--jit-compile", choices=("auto", "on", "off"), default="auto",
                   help="XLA; auto: on for GPUs, off for CPUs")
    d.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="BN batch statistics over all replicas (default: on with several "
                        "replicas, so that they train like one device on the global batch)")
    d.add_argument("--cpu-replicas", type=int, default=0,
                   help="split the CPU into N logical devices and mirror over them "
                        "(exercises the multi-device path without GPUs)")

    r = p.add_argument_group("outputs")
    r.add_argument("--run-dir", help="config, CSV/TensorBoard logs and backups (default runs/nam "
                                     "or runs/baseline)")
    r.add_argument("--output", help="final model file (default nam.keras or baseline.keras)")
    r.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="resume from the run directory's backup if there is one")
    r.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help="Keras verbosity: 1 = progress bar, 2 = one line per epoch")
    add_data_arguments(p)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.val_freq < 0:
        parser.error(f"--val-freq must be >= 0; received {args.val_freq}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0; received {args.warmup_steps}")
    if args.momentum >= 1:
        parser.error(f"--momentum must be in [0, 1); received {args.momentum}")

    from nam_keras.data import DataError
    from nam_keras.trainer import train
    from nam_keras.training import ConfigError

    try:
        return train(args)
    except (ConfigError, DataError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
