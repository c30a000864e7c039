"""What the command lines share: parsers derived from the settings tables,
console messages, and the mapping from errors to exit codes.

`train.py`, `evaluate.py` and the benchmarks stay thin: they parse with
`parse_config`, call the library, and report with `run_main`.
"""

import argparse
import dataclasses
import difflib
import logging
import os
import re
import sys

from nam_keras import io
from nam_keras.config import TrainConfig, flag
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


def start_quietly(cpu_replicas=0, cluster_timeout=600.0):
    """Starts the Keras backend's devices inside `console.quiet_startup`, so
    that CUDA's probing noise is dropped before the first message of ours
    (`import nam_keras` drops TensorFlow's import noise for the command lines).
    On JAX `cpu_replicas` > 1 asks for that many CPU devices (`--cpu-replicas`),
    and `JAX_COORDINATOR_ADDRESS` joins a cluster (`distribute.start_devices`)."""
    from nam_keras.training import distribute

    with quiet_startup(enabled=os.environ.get(QUIET_START) == "1"):
        distribute.start_devices(cpu_replicas, cluster_timeout)
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once: not for options whose help already names it, nor
    `None` (a default the help text describes)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` that suggests the closest option for one it does
    not know (`--epoch` -> "did you mean --epochs?")."""

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for a in self._actions for o in a.option_strings]
            for word in unknown.group(1).split():
                close = difflib.get_close_matches(word.split("=")[0], options, n=1)
                if word.startswith("-") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def build_parser(config_class, prog, description, explicit_only=False):
    """An `argparse.ArgumentParser` with one option per field of `config_class`.

    Options must be written in full (no abbreviations: `--epoch` is not
    `--epochs`). With `explicit_only`, the parsed namespace holds only the
    options given (every default is `argparse.SUPPRESS`): what a recipe must
    not override.
    """
    parser = _ArgumentParser(
        prog=prog, description=description, formatter_class=_HelpFormatter, allow_abbrev=False
    )
    groups = {}
    # the data options (shared by every command line) come last in --help
    fields = sorted(dataclasses.fields(config_class), key=lambda f: f.metadata["group"] == "data")
    for field in fields:
        _add_field(parser, groups, field, argparse.SUPPRESS if explicit_only else field.default)
    if issubclass(config_class, TrainConfig):
        groups["outputs"].add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="repeat the run recorded in FILE (a run directory's config.json): its settings, "
            "with the flags given on the command line winning",
        )
    return parser


def recorded_settings(path, config_class):
    """The settings of `config_class` recorded in a run's `config.json` at `path`
    (what `--config` repeats): its fields, as their constructor takes them."""
    advice = "; expected a config.json written by train.py (RUN/config.json)."
    recorded = io.read_json_object(path, "--config", advice)
    if recorded is None:
        raise ConfigError(f"--config {path}: no such file{advice}")
    if "written_by" not in recorded and "total_steps" not in recorded:
        raise ConfigError(f"--config {path} was not written by train.py{advice}")
    values = {}
    for field in dataclasses.fields(config_class):
        if field.name not in recorded:
            continue
        value = recorded[field.name]
        if field.name == "jit_compile" and isinstance(value, bool):  # resolved: on or off
            value = "on" if value else "off"
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return values


def as_flags(text, config_class):
    """`text` of the library, its arguments of `config_class` written as the command
    line's flags: `` `resume=False` `` -> `--no-resume`, `` `epochs=6` `` ->
    `--epochs 6`, `` `run_dir` `` -> `--run-dir`. Other text is left alone."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}

    def flag_of(match):
        name, value = match.group(1), match.group(2)
        field = fields.get(name)
        if field is None or field.metadata.get("positional"):
            return match.group(0)
        option = flag(field)
        if value is None:
            return option
        if value in ("True", "False") and field.metadata.get("action"):
            on = value == "True"
            if field.metadata["action"] == "boolean_optional":
                return option if on else "--no-" + option[2:]
            return option if on else f"no {option}"
        return f"{option} {value.strip(chr(39))}"

    return re.sub(r"`(\w+)(?:=([^`]*))?`", flag_of, text)


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
    config_file = values.pop("config", None)
    given.pop("config", None)
    try:
        if config_file is not None:  # the recorded run, the flags given winning
            config = config_class(**{**recorded_settings(config_file, config_class), **given})
            config.check_given(given)
            return config
        given.pop("recipe", None)
        if "recipe" in values:
            config = config_class.from_recipe(values["recipe"], **given)
        else:
            config = config_class(**values)
        if hasattr(config, "check_given"):
            config.check_given(given)
        return config
    except ConfigError as err:
        parser.error(as_flags(str(err), config_class))


class ConsoleHandler(logging.Handler):
    """Prints `[nam-keras] message` to whatever `sys.stdout` is at the time,
    with the arguments of `config_class` written as flags when it is given
    (`as_flags`)."""

    def __init__(self, config_class=None):
        super().__init__()
        self.config_class = config_class

    def emit(self, record):
        text = self.format(record)
        if self.config_class is not None:
            text = as_flags(text, self.config_class)
        print(f"[nam-keras] {text}", flush=True)


def setup_console(config_class=None):
    """Library progress messages (`logging`, logger "nam_keras") go to stdout,
    their arguments written as the flags of `config_class`; the command lines
    call this."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler(config_class))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_main(prog, function, *args):
    """Calls `function(*args)`; a known error becomes `prog: error: ...` on
    stderr and its exit code. Returns the exit code (0 on success). When the
    first argument is a config (`TrainConfig`, `EvalConfig`), the messages
    name its arguments as flags (`as_flags`)."""
    config_class = type(args[0]) if args and dataclasses.is_dataclass(args[0]) else None
    setup_console(config_class)
    try:
        function(*args)
    except tuple(EXIT_CODES) as err:
        text = str(err) if config_class is None else as_flags(str(err), config_class)
        print(f"{prog}: error: {text}", file=sys.stderr)
        code = next(code for cls, code in EXIT_CODES.items() if isinstance(err, cls))
        return code + getattr(err, "signum", 0)
    return 0
