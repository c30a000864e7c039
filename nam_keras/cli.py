"""What the command lines share: parsers derived from the settings tables,
console messages, and the mapping from errors to exit codes.

`train.py`, `evaluate.py` and the benchmarks stay thin: they parse with
`parse_config`, call the library, and report with `run_main`.
"""

import argparse
import dataclasses
import logging
import os
import sys

from nam_keras.config import flag
from nam_keras.console import QUIET_START, quiet_startup
from nam_keras.errors import (
    ConfigError,
    DataError,
    ModelError,
    NonFiniteLossError,
    TrainingInterruptedError,
)

#: error class -> exit code; anything else is a bug and keeps its traceback.
#: An interrupted run exits as the shell reports a signal: 128 + its number.
EXIT_CODES = {
    ConfigError: 2,
    DataError: 2,
    ModelError: 2,
    NonFiniteLossError: 1,
    TrainingInterruptedError: 128,
}

LOGGER_NAME = "nam_keras"


def start_quietly():
    """Asks the Keras backend for its devices inside `console.quiet_startup`, so
    that CUDA's probing noise is dropped before the first message of ours
    (`import nam_keras` drops TensorFlow's import noise for the command lines)."""
    from nam_keras.training import distribute

    with quiet_startup(enabled=os.environ.get(QUIET_START) == "1"):
        distribute.accelerators()


def _argparse_type(check):
    """A validator as an argparse `type` (argparse shows its message)."""

    def convert(text):
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = check.__name__
    return convert


def _add_field(parser, groups, field, default):
    meta = field.metadata
    group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
    if meta.get("positional"):
        group.add_argument(field.name, help=meta["help"])
        return
    if meta.get("flags"):  # shortcut flags that each set one value, exclusive with the option
        group = group.add_mutually_exclusive_group()
        for option, (value, text) in meta["flags"].items():
            group.add_argument(
                option,
                dest=field.name,
                action="store_const",
                const=value,
                help=text,
                default=argparse.SUPPRESS,  # the field's default is the option's (below)
            )
    kwargs = {"default": default, "help": meta["help"], "dest": field.name}
    action = meta.get("action")
    if action == "boolean_optional":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif action:
        kwargs["action"] = action
    else:
        if meta.get("type"):
            kwargs["type"] = _argparse_type(meta["type"])
        for key in ("choices", "nargs", "metavar"):
            if meta.get(key) is not None:
                kwargs[key] = meta[key]
    group.add_argument(flag(field), **kwargs)


def build_parser(config_class, prog, description, explicit_only=False):
    """An `argparse.ArgumentParser` with one option per field of `config_class`.

    With `explicit_only`, the parsed namespace holds only the options given
    (every default is `argparse.SUPPRESS`): what a recipe must not override.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    groups = {}
    # the data options (shared by every command line) come last in --help
    fields = sorted(dataclasses.fields(config_class), key=lambda f: f.metadata["group"] == "data")
    for field in fields:
        _add_field(parser, groups, field, argparse.SUPPRESS if explicit_only else field.default)
    return parser


def _config_values(namespace):
    """Namespace -> constructor arguments (argparse's lists become tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items()}


def parse_config(config_class, argv, prog, description):
    """Parses `argv` into a `config_class`; bad flags exit 2 with argparse's message.

    A `--recipe` presets its settings (`config.RECIPES`); the options given
    on the command line win over it.
    """
    parser = build_parser(config_class, prog, description)
    values = _config_values(parser.parse_args(argv))
    explicit = build_parser(config_class, prog, description, explicit_only=True)
    given = _config_values(explicit.parse_args(argv))
    given.pop("recipe", None)
    try:
        if "recipe" in values:
            config = config_class.from_recipe(values["recipe"], **given)
        else:
            config = config_class(**values)
        if hasattr(config, "check_given"):
            config.check_given(given)
        return config
    except ConfigError as err:
        parser.error(str(err))


class _ConsoleHandler(logging.Handler):
    """Prints `[nam-keras] message` to whatever `sys.stdout` is at the time."""

    def emit(self, record):
        print(f"[nam-keras] {self.format(record)}", flush=True)


def setup_console():
    """Library progress messages (`logging`, logger "nam_keras") go to stdout;
    only the command lines call this."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_main(prog, function, *args):
    """Calls `function(*args)`; a known error becomes `prog: error: ...` on
    stderr and its exit code. Returns the exit code (0 on success)."""
    setup_console()
    try:
        function(*args)
    except tuple(EXIT_CODES) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        code = next(code for cls, code in EXIT_CODES.items() if isinstance(err, cls))
        return code + getattr(err, "signum", 0)
    return 0
