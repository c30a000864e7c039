"""The run directory of `train.py`: its files, its lock, its backups, resuming.

Rules that keep a user's work:
- one process per run directory (`lock`, released by the OS when a process
  dies, even by SIGKILL);
- backups are whole files or absent (`callbacks.EpochBackup` writes each
  epoch's weights and optimizer state to a temporary file and renames it to
  `backup/epoch-NNNNN.weights.h5`; the epoch is in the name, so weights and
  epoch cannot disagree), and the previous one is kept;
- resuming trusts a backup only when it loads and its optimizer step count
  matches its epoch; otherwise the previous one, otherwise a clear refusal;
- only files this program wrote are ever deleted or replaced: a folder
  without our `config.json` is never cleaned, an old `log.csv` is kept under
  another name, and a finished run is not trained again over its model.
"""

import contextlib
import csv
import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
import time

import numpy as np

from nam_keras import io
from nam_keras.errors import ConfigError

logger = logging.getLogger("nam_keras")

#: Key of `config.json` that marks a run directory as written by train.py.
OWNER_KEY = "written_by"
OWNER = "nam-keras train.py"
BACKUP_PATTERN = re.compile(r"^epoch-(\d{5,})\.weights\.h5$")
LEGACY_BACKUP = ("latest.weights.h5", "training_metadata.json")  # Keras' BackupAndRestore


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The files of one run."""

    run_dir: str
    output: str

    @property
    def backup(self):
        return os.path.join(self.run_dir, "backup")

    @property
    def log_csv(self):
        return os.path.join(self.run_dir, "log.csv")

    @property
    def config_json(self):
        return os.path.join(self.run_dir, "config.json")

    @property
    def summary_json(self):
        return os.path.join(self.run_dir, "summary.json")

    @property
    def tensorboard(self):
        return os.path.join(self.run_dir, "tensorboard")

    @property
    def lock_file(self):
        return os.path.join(self.run_dir, ".lock")


def backup_path(backup_dir, epoch):
    """Where the backup after `epoch` completed epochs is written."""
    return os.path.join(backup_dir, f"epoch-{epoch:05d}.weights.h5")


# ------------------------------------------------------------------ lock


@contextlib.contextmanager
def lock(paths):
    """Holds the run directory for this process; a second one is refused.

    An advisory `fcntl` lock on `run_dir/.lock`: the OS releases it when the
    holder exits or is killed, so a crashed run never leaves it stuck.
    """
    import fcntl

    try:
        handle = open(paths.lock_file, "a+")  # noqa: SIM115 - held for the whole block
    except OSError as err:
        raise ConfigError(f"cannot use run directory {paths.run_dir}: {err.strerror}.") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"{paths.run_dir} is in use by {holder}: two runs on one run directory "
                "would overwrite each other's backups and logs. Wait for it to finish, or "
                "choose another --run-dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"train.py (pid {os.getpid()})\n")
        handle.flush()
        yield
    finally:
        handle.close()


# ------------------------------------------------------------------ state of a run directory


def read_json(path, what):
    """A JSON object from `path`, `None` when absent; `ConfigError` when damaged."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path} ({what}) is damaged ({type(err).__name__}: {err}); pass --no-resume to "
            "start afresh or choose another --run-dir."
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} ({what}) is not a JSON object; pass --no-resume.")
    return value


def owned(paths):
    """True when `config.json` says train.py wrote this run directory."""
    try:
        config = read_json(paths.config_json, "the run's settings")
    except ConfigError:
        return False
    if not config:
        return False
    legacy = "peak_lr" in config and "total_steps" in config  # before the marker existed
    return config.get(OWNER_KEY) == OWNER or legacy


def completed(paths):
    """The summary of a finished run whose model still exists, else `None`."""
    try:
        summary = read_json(paths.summary_json, "the run's summary")
    except ConfigError:
        return None
    if summary and summary.get("complete") and os.path.isfile(summary.get("output", "")):
        return summary
    return None


def check_resumable(paths, resolved, keys, defaults=None):
    """Refuses a run directory whose `config.json` differs in `keys`.

    A key missing from that file (a setting added since it was written) is
    taken to be `defaults[key]`, the value the older version used.
    """
    old = read_json(paths.config_json, "the run's settings")
    if old is None:
        raise ConfigError(
            f"{paths.backup} has backups but {paths.config_json} is missing, so they cannot "
            "be checked against this run; pass --no-resume to start afresh or choose "
            "another --run-dir."
        )
    old = {**(defaults or {}), **old}
    changed = {k: (old.get(k), resolved[k]) for k in keys if old.get(k) != resolved[k]}
    if changed:
        raise ConfigError(
            f"{paths.run_dir} holds a backup of a different run ({changed}, as "
            "(saved, now)); pass --no-resume to start afresh or choose another --run-dir."
        )


# ------------------------------------------------------------------ backups


def _legacy_epoch(backup_dir):
    try:
        with open(os.path.join(backup_dir, LEGACY_BACKUP[1])) as f:
            epoch = json.load(f)["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def backups(backup_dir):
    """`[(epoch, weights path)]`, newest first (Keras' old pair included)."""
    found = []
    if os.path.isdir(backup_dir):
        for name in os.listdir(backup_dir):
            match = BACKUP_PATTERN.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(backup_dir, name)))
        legacy = _legacy_epoch(backup_dir)
        if legacy is not None and os.path.isfile(os.path.join(backup_dir, LEGACY_BACKUP[0])):
            found.append((legacy, os.path.join(backup_dir, LEGACY_BACKUP[0])))
    return sorted(found, reverse=True)


def _load(model, path, epoch, steps_per_epoch):
    """Loads one backup; raises when it does not load or disagrees with its epoch."""
    model.load_weights(path)
    steps = int(model.optimizer.iterations.numpy())
    if steps != epoch * steps_per_epoch:
        raise ValueError(
            f"it holds {steps} optimizer steps, not the {epoch} x {steps_per_epoch} of its epoch"
        )


def restore(model, paths, epochs, steps_per_epoch):
    """Loads the newest backup that is whole into `model` (optimizer included).

    Returns:
        The number of completed epochs it holds, or `None` without backups.

    Raises:
        ConfigError: a backup beyond `epochs`, or no backup that loads.
    """
    candidates = backups(paths.backup)
    if not candidates:
        return None
    if candidates[0][0] > epochs or candidates[-1][0] < 0:
        raise ConfigError(
            f"{paths.backup} holds a backup after {candidates[0][0]} epochs, outside 0..{epochs} "
            f"(--epochs {epochs}); pass --epochs {candidates[0][0]} to finish that run, or "
            "--no-resume to start afresh."
        )
    model.optimizer.build(model.trainable_variables)
    failures = []
    for epoch, path in candidates:
        try:
            _load(model, path, epoch, steps_per_epoch)
            if failures:
                logger.info(f"warning: skipped damaged backup(s): {'; '.join(failures)}")
            return epoch
        except Exception as err:
            failures.append(f"{os.path.basename(path)} ({type(err).__name__}: {err})")
    raise ConfigError(
        f"no backup in {paths.backup} can be loaded: {'; '.join(failures)}. Pass --no-resume "
        "to start afresh (the damaged backups are then removed)."
    )


def remove_backups(backup_dir, keep=0):
    """Deletes this program's backup files but the newest `keep`, and its
    leftover temporary files; never other files. With `keep=0` the folder
    goes too, when nothing else is in it."""
    names = [os.path.basename(p) for _, p in backups(backup_dir)]
    doomed = names[keep:] + [
        os.path.basename(p) for p in glob.glob(os.path.join(backup_dir, ".tmp-*"))
    ]
    if keep == 0:
        doomed += [LEGACY_BACKUP[1], LEGACY_BACKUP[1] + ".bkp", LEGACY_BACKUP[0] + ".bkp"]
    for name in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(backup_dir, name))
    if keep == 0:
        with contextlib.suppress(OSError):
            os.rmdir(backup_dir)  # only when nothing else is in it


# ------------------------------------------------------------------ starting a run


def _set_aside(path, reason):
    """Renames `path` to `<stem>-<reason>-<UTC time><suffix>`; returns the new path."""
    stem, suffix = os.path.splitext(path)
    target = f"{stem}-{reason}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}{suffix}"
    os.replace(path, target)
    return target


def start_afresh(paths):
    """`--no-resume`: drops this program's backups and summary; keeps the old log."""
    if os.path.exists(paths.backup) and backups(paths.backup) and not owned(paths):
        raise ConfigError(
            f"{paths.backup} holds backups, but {paths.config_json} is missing or damaged, so "
            "they may not have been written by train.py; they are left alone. Move them away "
            "or choose another --run-dir."
        )
    remove_backups(paths.backup)
    if os.path.exists(paths.summary_json) and owned(paths):
        os.remove(paths.summary_json)
    if os.path.exists(paths.log_csv):
        kept = _set_aside(paths.log_csv, "previous")
        logger.info(f"the previous run's log is kept as {kept}")


def truncate_log(paths, first_epoch):
    """Keeps the CSV rows of epochs before `first_epoch` (those the backup holds);
    a log that cannot be read is set aside, not lost."""
    if not os.path.exists(paths.log_csv):
        return
    try:
        with open(paths.log_csv, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < first_epoch]
    except (OSError, ValueError, UnicodeDecodeError):
        kept_as = _set_aside(paths.log_csv, "damaged")
        logger.info(f"warning: {paths.log_csv} could not be read; kept as {kept_as}")
        return
    io.atomic_write_text(paths.log_csv, "".join(",".join(r) + "\n" for r in kept))


def check_layout(paths):
    """Refuses a run directory whose parts are not what they should be."""
    for path, kind in (
        (paths.backup, "folder"),
        (paths.tensorboard, "folder"),
        (paths.config_json, "file"),
        (paths.log_csv, "file"),
    ):
        wrong = os.path.isfile(path) if kind == "folder" else os.path.isdir(path)
        if wrong:
            raise ConfigError(
                f"{path} should be a {kind} of the run directory; move it away or choose "
                "another --run-dir."
            )


def remove_if_unused(paths):
    """Removes the run directory when it holds nothing but the lock file."""
    with contextlib.suppress(OSError):
        if os.listdir(paths.run_dir) == [os.path.basename(paths.lock_file)]:
            os.remove(paths.lock_file)
            os.rmdir(paths.run_dir)


def make(paths):
    """Creates the run directory; `ConfigError` naming it when the OS refuses."""
    io.make_folder(paths.run_dir)


def prepare(paths, resume):
    """Checks the run directory's layout and applies `--no-resume`."""
    try:
        check_layout(paths)
        if not resume:
            start_afresh(paths)
    except OSError as err:
        raise ConfigError(
            f"cannot use run directory {paths.run_dir}: {err.strerror or err}."
        ) from None


def disk_needed(model):
    """Bytes a run writes at most at once: two backups (weights and optimizer
    state) and the model, with a margin."""
    weights = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights)
    return 6 * weights + (16 << 20)


def check_free_space(paths, model):
    """Refuses to start when the disk cannot hold the backups and the model."""
    needed = disk_needed(model)
    for folder in {paths.run_dir, os.path.dirname(os.path.abspath(paths.output))}:
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise ConfigError(
                f"only {free / 1e6:.0f} MB free in {folder}; this run's backups and model need "
                f"about {needed / 1e6:.0f} MB. Free some space or choose another folder."
            )
