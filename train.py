"""Command-line entry point; the logic lives in the nam_keras package."""

import sys


def main(argv=None):
    print("train.py: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
