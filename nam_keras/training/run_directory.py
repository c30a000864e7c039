"""The run directory of `train.py`: one object that owns a run's lifecycle.

    with RunDirectory.open(run_dir, output, settings, resume_keys, resume) as run:
        if run.finished is None:
            initial_epoch = run.resume(model, epochs, steps_per_epoch)
            model.fit(..., initial_epoch=initial_epoch,
                      callbacks=[..., run.callback(steps_per_epoch, epochs)])
            run.finish(model, history, summary)

`open` locks the folder, checks it and records the settings; `resume` loads
the newest whole backup before training; the callback writes one after every
epoch; `finish` writes the model and the summary atomically and drops
the backups.

Rules that keep a user's work:
- one process per run directory (an advisory lock, released by the OS when a
  process dies, even by SIGKILL);
- backups are whole files or absent (each epoch's weights and optimizer state
  go to a temporary file renamed to `backup/epoch-NNNNN.weights.h5`; the
  epoch is in the name, so weights and epoch cannot disagree), and the
  previous one is kept;
- resuming trusts a backup only when it loads and its optimizer step count
  matches its epoch; otherwise the previous one, otherwise a clear refusal;
- the run directory is ours alone: nothing is written, truncated or deleted
  through a symbolic link (a folder whose entries where the run writes are
  links is refused, naming them; the lock and the log are opened without
  following links), and backups are deleted only when recorded in
  `backup/written.json` as files this program wrote;
- a file we did not write is never overwritten: a folder holding a
  `config.json`, `log.csv` or `summary.json` that is not ours is refused, an
  old `log.csv` is kept under another name;
- a finished run is a record: re-running it with other settings or another
  `--output` is refused with the differences listed, and it is never trained
  again over its model.
"""

import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import time

import keras
import numpy as np
from keras import ops

from nam_keras import io
from nam_keras.errors import ConfigError

logger = logging.getLogger("nam_keras")

#: Key of `config.json` that marks a run directory as written by train.py.
OWNER_KEY = "written_by"
OWNER = "nam-keras train.py"
BACKUP_PATTERN = re.compile(r"^epoch-(\d{5,})\.weights\.h5$")
LEGACY_BACKUP = ("latest.weights.h5", "training_metadata.json")  # Keras' BackupAndRestore
#: How many epoch backups are kept (the newest may be lost to a full disk).
KEEP_BACKUPS = 2
#: In `backup/`: the names of the files this program wrote there (JSON).
MANIFEST = "written.json"
#: Key of `config.json` saying that backups are recorded (versions before did not:
#: their backups are taken as theirs once, by name, when such a run is resumed).
RECORD_KEY = "backups_recorded_in"
#: What a run writes in its folder (`backup/`'s files are checked one by one).
ENTRIES = (
    ".lock",
    "config.json",
    "log.csv",
    "summary.json",
    "best.keras",
    "backup",
    "tensorboard",
)
#: What `best.keras` is chosen by: the validation top-1 of the epoch logs.
BEST_BY = "val_top1"
TENSORBOARD_FOLDERS = ("train", "validation")


def backup_path(backup_dir, epoch):
    """Where the backup after `epoch` completed epochs is written."""
    return os.path.join(backup_dir, f"epoch-{epoch:05d}.weights.h5")


def read_json(path, what):
    """A JSON object of the run directory, `None` when absent; `ConfigError` when
    damaged, naming the way out (`io.read_json_object`)."""
    advice = "; pass `resume=False` to start afresh or choose another `run_dir`."
    return io.read_json_object(path, what, advice)


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


def _manifest(backup_dir):
    """The names recorded in `backup/written.json` (an empty set when absent or damaged)."""
    try:
        with open(os.path.join(backup_dir, MANIFEST)) as f:
            names = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return set()
    return {n for n in names if isinstance(n, str) and os.path.basename(n) == n}


def _record(backup_dir, names):
    """Records `names` (a set) as this program's files in `backup/`."""
    text = json.dumps({OWNER_KEY: OWNER, "files": sorted(names)}, indent=1)
    io.atomic_write_text(os.path.join(backup_dir, MANIFEST), text + "\n")


def adopt_earlier_backups(backup_dir):
    """Records the backups an earlier version of this program wrote without a
    record (call it only for a run directory whose `config.json` is ours)."""
    if os.path.isdir(backup_dir) and not os.path.exists(os.path.join(backup_dir, MANIFEST)):
        names = [os.path.basename(p) for _, p in backups(backup_dir)]
        names += [
            n
            for n in (LEGACY_BACKUP[1], LEGACY_BACKUP[0] + ".bkp", LEGACY_BACKUP[1] + ".bkp")
            if os.path.isfile(os.path.join(backup_dir, n))
        ]
        if names:
            _record(backup_dir, set(names))


def remove_backups(backup_dir, keep=0):
    """Deletes this program's backups but the newest `keep`: only regular files
    recorded in `backup/written.json`, never through a link and never anything
    else (a temporary file left by a kill is recorded before it is written).
    With `keep=0` every recorded file, the record and the folder go, the folder
    only when nothing else is in it."""
    if os.path.islink(backup_dir) or not os.path.isdir(backup_dir):
        return
    recorded = _manifest(backup_dir)
    if keep == 0:
        doomed = set(recorded)
    else:
        newest_first = [os.path.basename(p) for _, p in backups(backup_dir)]
        ours = [n for n in newest_first if n in recorded]
        doomed = set(ours[keep:]) | {n for n in recorded if n.startswith(".tmp-")}
    for name in doomed:
        path = os.path.join(backup_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
    left = recorded - doomed
    if keep == 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(backup_dir, MANIFEST))
        with contextlib.suppress(OSError):
            os.rmdir(backup_dir)  # only when nothing else is in it
    elif left != recorded:
        _record(backup_dir, left)


def disk_needed(model):
    """Bytes a run writes at most at once: two backups (weights and optimizer
    state) and the model, with a margin."""
    weights = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights)
    return 6 * weights + (16 << 20)


def _set_aside(path, reason):
    """Renames `path` to `<stem>-<reason>-<UTC time>[-N]<suffix>`, a name not in
    use (nothing is replaced); returns the new path."""
    stem, suffix = os.path.splitext(path)
    base = f"{stem}-{reason}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    target, n = base + suffix, 1
    while os.path.lexists(target):
        n += 1
        target = f"{base}-{n}{suffix}"
    os.rename(path, target)
    return target


# ------------------------------------------------------------------ the run directory


class RunDirectory:
    """The folder of one training run and its final model file.

    Create it with `RunDirectory.open` (a context manager that holds the
    folder's lock); the training callback of `callback` restores and writes
    the backups; `finish` writes the results.

    Attributes:
        run_dir: the folder.
        output: the final `.keras` file.
        finished: the summary of this very run when it finished before (then
            there is nothing to train), else `None`.
    """

    def __init__(self, run_dir, output):
        self.run_dir = os.fspath(run_dir)
        self.output = os.fspath(output)
        self.finished = None

    # === the files ===
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
    def best_model(self):
        """`best.keras`: the model of the epoch with the best validation top-1."""
        return os.path.join(self.run_dir, "best.keras")

    @property
    def tensorboard(self):
        return os.path.join(self.run_dir, "tensorboard")

    @property
    def lock_file(self):
        return os.path.join(self.run_dir, ".lock")

    # === open ===
    @classmethod
    @contextlib.contextmanager
    def open(cls, run_dir, output, settings, resume_keys, resume=True, defaults=None, extend=False):
        """Holds the run directory for one run, from its checks to its end.

        Creates and locks the folder, checks its layout, applies
        `resume=False` (drops our backups and summary, keeps the old log),
        finds a finished run (`finished`), checks a backup against the
        recorded settings and records `settings` in `config.json`. A folder
        this call created is removed again when the run leaves nothing in it.

        Args:
            run_dir: the folder.
            output: the final `.keras` file (checked writable first).
            settings: the resolved settings, JSON-ready (`config.json`).
            resume_keys: the settings a backup or a finished run must share.
            resume: resume from a backup; `False` starts afresh.
            defaults: values of settings missing from an older `config.json`.
            extend: the run may have more epochs than recorded: a finished
                run goes on from its model (`settings["epochs"]` must be more
                than it has), an unfinished one from its backup.

        Raises:
            ConfigError: a path, a lock, a damaged or different run.
        """
        run = cls(run_dir, output)
        cls.check_paths(run.run_dir, run.output)
        created = not os.path.exists(run.run_dir)
        io.make_folder(run.run_dir)
        new_lock = not os.path.lexists(run.lock_file)
        try:
            run._refuse_links()
            with run._lock():
                run._prepare(resume)
                run._check_and_record(settings, resume_keys, resume, defaults or {}, extend)
                yield run
        finally:
            if created:
                run._remove_if_unused()
            elif new_lock and not run.owned():  # refused in a folder of someone else's
                with contextlib.suppress(OSError):
                    os.remove(run.lock_file)

    @staticmethod
    def check_paths(run_dir, output):
        """`ConfigError` unless the folder `run_dir` can be created or used and the
        file `output` written; creates nothing. `open` checks them again: call it
        first to fail before long work (loading the data)."""
        io.check_folder(run_dir)
        io.check_writable(output)

    @contextlib.contextmanager
    def _lock(self):
        """An advisory `fcntl` lock on `.lock`; a second holder is refused."""
        import fcntl

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            handle = os.fdopen(os.open(self.lock_file, flags, 0o644), "r+")
        except OSError as err:
            raise ConfigError(
                f"cannot use run directory {self.run_dir}: {self.lock_file}: {err.strerror}."
            ) from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise ConfigError(
                    f"{self.run_dir} is in use by {holder}: two runs on one run directory "
                    "would overwrite each other's backups and logs. Wait for it to finish, or "
                    "choose another `run_dir`."
                ) from None
            handle.seek(0)
            content = handle.read()
            if content and not content.startswith("train.py (pid"):
                raise ConfigError(
                    f"{self.lock_file} is not a lock file of train.py; it is left alone. Move it "
                    "away or choose another `run_dir`."
                )
            handle.seek(0)
            handle.truncate()
            handle.write(f"train.py (pid {os.getpid()})\n")
            handle.flush()
            yield
        finally:
            handle.close()

    def _refuse_links(self):
        """Refuses symbolic links where the run writes: it never writes through one."""
        paths = [os.path.join(self.run_dir, name) for name in ENTRIES]
        paths += [os.path.join(self.tensorboard, name) for name in TENSORBOARD_FOLDERS]
        if os.path.isdir(self.backup) and not os.path.islink(self.backup):
            paths += [os.path.join(self.backup, name) for name in os.listdir(self.backup)]
        links = [p for p in paths if os.path.islink(p)]
        if links:
            raise ConfigError(
                f"{self.run_dir} holds symbolic links where train.py writes ({', '.join(links)}); "
                "it never writes or deletes through a link. Remove them or choose another "
                "`run_dir`."
            )

    def _refuse_foreign_files(self):
        """Refuses a folder holding a settings, log or summary file that train.py did not
        write: it is never overwritten."""
        names = ("config.json", "log.csv", "summary.json")
        present = [n for n in names if os.path.exists(os.path.join(self.run_dir, n))]
        if present and not self.owned():
            raise ConfigError(
                f"{self.run_dir} holds {', '.join(present)} that train.py did not write (no "
                f"config.json of ours); they are left alone. Choose another `run_dir`, or move "
                "them away."
            )

    def _prepare(self, resume):
        try:
            self._check_layout()
            self._set_aside_damaged_settings(resume)
            self._refuse_foreign_files()
            if self.owned() and not self._records_backups():
                adopt_earlier_backups(self.backup)
            if not resume:
                self._start_afresh()
        except OSError as err:
            raise ConfigError(
                f"cannot use run directory {self.run_dir}: {err.strerror or err}."
            ) from None

    def _check_layout(self):
        for path, kind in (
            (self.backup, "folder"),
            (self.tensorboard, "folder"),
            (self.config_json, "file"),
            (self.log_csv, "file"),
        ):
            wrong = os.path.isfile(path) if kind == "folder" else os.path.isdir(path)
            if wrong:
                raise ConfigError(
                    f"{path} should be a {kind} of the run directory; move it away or choose "
                    "another `run_dir`."
                )

    def _set_aside_damaged_settings(self, resume):
        """With `resume=False`, a damaged `config.json` is kept as a copy (starting
        afresh would replace it); with `resume=True`, `read_json` says it is damaged."""
        try:
            read_json(self.config_json, "the run's settings")
        except ConfigError:
            if resume:
                raise
            kept = _set_aside(self.config_json, "damaged")
            logger.info(f"the damaged {self.config_json} is kept as {kept}")

    def _records_backups(self):
        """True when `config.json` was written by a version that records its backups."""
        with contextlib.suppress(ConfigError):
            return RECORD_KEY in (read_json(self.config_json, "the run's settings") or {})
        return False

    def owned(self):
        """True when `config.json` says train.py wrote this run directory."""
        try:
            config = read_json(self.config_json, "the run's settings")
        except ConfigError:
            return False
        if not config:
            return False
        legacy = "peak_lr" in config and "total_steps" in config  # before the marker existed
        return config.get(OWNER_KEY) == OWNER or legacy

    def _start_afresh(self):
        if os.path.exists(self.backup) and backups(self.backup) and not self.owned():
            raise ConfigError(
                f"{self.backup} holds backups, but {self.config_json} is missing or damaged, so "
                "they may not have been written by train.py; they are left alone. Move them away "
                "or choose another `run_dir`."
            )
        remove_backups(self.backup)
        if os.path.exists(self.summary_json) and self.owned():
            os.remove(self.summary_json)
        for path in (self.log_csv, self.best_model):
            if os.path.exists(path):
                kept = _set_aside(path, "previous")
                logger.info(f"the previous run's {os.path.basename(path)} is kept as {kept}")

    def _recorded_finish(self):
        """The summary of a run recorded as finished (its model may be missing since),
        else `None`; `ConfigError` when `summary.json` is damaged."""
        summary = read_json(self.summary_json, "the run's summary") or {}
        finished = summary.get("complete") is True and isinstance(summary.get("output"), str)
        return summary if finished else None

    def completed(self):
        """The summary of a finished run whose model still exists, else `None`."""
        with contextlib.suppress(ConfigError):
            summary = self._recorded_finish()
            if summary is not None and os.path.isfile(summary["output"]):
                return summary
        return None

    def check_resumable(self, settings, keys, defaults=None):
        """Refuses a run directory whose `config.json` differs in `keys`.

        A key missing from that file (a setting added since it was written) is
        taken to be `defaults[key]`, the value the older version used.
        """
        if not os.path.exists(self.config_json):
            raise ConfigError(
                f"{self.backup} has backups but {self.config_json} is missing, so they cannot "
                "be checked against this run; pass `resume=False` to start afresh or choose "
                "another `run_dir`."
            )
        changed = self._changed_settings(settings, keys, defaults)
        if changed:
            raise ConfigError(
                f"{self.run_dir} holds a backup of a different run ({changed}, as "
                "(saved, now)); pass `resume=False` to start afresh or choose another `run_dir`."
            )

    def _check_and_record(self, settings, keys, resume, defaults, extend=False):
        if extend:
            keys = [k for k in keys if k != "epochs"]
        done = self._recorded_finish() if resume else None
        extended_from = None
        if done is not None:
            self._refuse_a_missing_model(done["output"])
            self._check_finished(done, settings, keys, defaults)
            remove_backups(self.backup)  # leftovers of a run stopped while cleaning up
            if not extend:
                self.finished = done
                return
            self._extend(done, settings["epochs"])
            extended_from = done["epochs"]
        if resume and backups(self.backup):
            self.check_resumable(settings, keys, defaults)
        record = {OWNER_KEY: OWNER, RECORD_KEY: f"backup/{MANIFEST}", **settings}
        if extended_from is not None:
            record["extended_from_epochs"] = extended_from
        text = json.dumps(record, indent=2, default=str)
        io.atomic_write_text(self.config_json, text + "\n")

    def _changed_settings(self, settings, keys, defaults=None):
        """`{key: (recorded, now)}` for the `keys` where `settings` differ from
        `config.json`; a key it lacks (added since) is `defaults[key]`."""
        old = {**(defaults or {}), **(read_json(self.config_json, "the run's settings") or {})}
        return {k: (old.get(k), settings[k]) for k in keys if old.get(k) != settings[k]}

    def _check_finished(self, done, settings, keys, defaults):
        """A finished run is a record: the same settings and `--output`, or a refusal."""
        changed = self._changed_settings(settings, keys, defaults)
        if self.output != done["output"]:
            changed["output"] = (done["output"], self.output)
        if changed:
            raise ConfigError(
                f"{self.run_dir} holds a finished run ({done.get('epochs')} epochs, model "
                f"{done['output']}); this command differs in {changed} (as (recorded, now)). A "
                "finished run is a record: choose another `run_dir`, pass `extend=True` to give "
                "it more `epochs`, or pass `resume=False` to train again in this one (its log is "
                "kept)."
            )

    def _extend(self, done, epochs):
        """Turns the finished run `done` into an unfinished one of `epochs` epochs:
        its model (weights and optimizer state) becomes the backup of its last
        epoch, then its summary goes. A kill in between leaves either the
        finished run or a run to resume: the same command goes on from either."""
        if epochs <= done["epochs"]:
            raise ConfigError(
                f"`epochs={epochs}` with `extend=True`: the finished run in {self.run_dir} has "
                f"{done['epochs']} epochs; expected more than {done['epochs']} epochs."
            )
        self.finished = done
        self.write_backup(self.load_finished_model(), done["epochs"])
        self.finished = None
        os.remove(self.summary_json)
        logger.info(
            f"extending the finished run in {self.run_dir} from {done['epochs']} to {epochs} "
            f"epochs; its learning-rate schedule is recomputed for {epochs} epochs"
        )

    def _refuse_a_missing_model(self, output):
        if not os.path.isfile(output):
            raise ConfigError(
                f"{self.run_dir} holds a finished run whose model {output} is missing; a finished "
                "run is a record and is not trained again over it. Put the model back, choose "
                "another `run_dir`, or pass `resume=False` to train again here (its log is kept)."
            )

    def load_finished_model(self):
        """The model of the finished run (`finished`); `ConfigError` naming the way
        out when it cannot be loaded."""
        path = self.finished["output"]
        try:
            return keras.models.load_model(path)
        except Exception as err:
            raise ConfigError(
                f"{path}, the model of the finished run in {self.run_dir}, cannot be loaded "
                f"({type(err).__name__}: {err}); its backups are gone. Pass `resume=False` to "
                "train it again (the log is kept), or restore the file."
            ) from None

    def _remove_if_unused(self):
        with contextlib.suppress(OSError):
            if os.listdir(self.run_dir) == [os.path.basename(self.lock_file)]:
                os.remove(self.lock_file)
                os.rmdir(self.run_dir)

    # === during training ===
    def callback(self, steps_per_epoch, epochs, scope=contextlib.nullcontext):
        """The Keras callback that backs up after every epoch (`EpochBackup`)."""
        return EpochBackup(self, steps_per_epoch, epochs, scope)

    def resume(self, model, epochs, steps_per_epoch, scope=contextlib.nullcontext):
        """Before `fit`: checks the free disk space and loads the newest whole
        backup into the compiled `model` (`restore`, inside `scope`, the
        `tf.distribute` strategy's). Returns the completed epochs (0 without a
        backup): give them to `fit` as `initial_epoch`, and start the data at
        that epoch's first step, so that the run goes on as if uninterrupted."""
        self.check_free_space(model)
        with scope():
            epoch = self.restore(model, epochs, steps_per_epoch)
        if epoch is None:
            return 0
        logger.info(f"resuming from the backup in {self.backup}: {epoch} of {epochs} epochs done")
        return epoch

    def best_checkpoint(self):
        """The Keras callback that keeps `best.keras` (`BestCheckpoint`)."""
        return BestCheckpoint(self)

    def best_logged(self):
        """The best `BEST_BY` in `log.csv` (the epochs kept), `None` without one."""
        try:
            with open(self.log_csv, newline="") as f:
                values = [float(r[BEST_BY]) for r in csv.DictReader(f) if r.get(BEST_BY)]
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return max(values, default=None)

    def csv_logger(self):
        """`keras.callbacks.CSVLogger` on `log.csv`, appending, opened without
        following a link (`CSVLog`)."""
        return CSVLog(self.log_csv, append=True)

    def check_free_space(self, model):
        """Refuses to start when the disk cannot hold the backups and the model."""
        needed = disk_needed(model)
        for folder in {self.run_dir, os.path.dirname(os.path.abspath(self.output))}:
            free = shutil.disk_usage(folder).free
            if free < needed:
                raise ConfigError(
                    f"only {free / 1e6:.0f} MB free in {folder}; this run's backups and model "
                    f"need about {needed / 1e6:.0f} MB. Free some space or choose another folder."
                )

    def restore(self, model, epochs, steps_per_epoch):
        """Loads the newest backup that is whole into `model` (optimizer
        included) and keeps the log rows of the epochs it holds. Only backups
        recorded as this program's are read.

        Without a backup, an existing `log.csv` is set aside, so the run's log
        starts afresh.

        Returns:
            The number of completed epochs it holds, or `None` without backups.

        Raises:
            ConfigError: a backup beyond `epochs`, or no backup that loads.
        """
        recorded = _manifest(self.backup)
        candidates = [(e, p) for e, p in backups(self.backup) if os.path.basename(p) in recorded]
        if not candidates:
            if os.path.exists(self.log_csv):  # rows of no backup: not this run's log
                kept = _set_aside(self.log_csv, "previous")
                logger.info(f"an earlier log is kept as {kept}")
            return None
        if candidates[0][0] > epochs or candidates[-1][0] < 0:
            raise ConfigError(
                f"{self.backup} holds a backup after {candidates[0][0]} epochs, outside "
                f"0..{epochs} (`epochs={epochs}`); pass `epochs={candidates[0][0]}` to finish "
                "that run, or `resume=False` to start afresh."
            )
        if not model.optimizer.built:  # built already inside `fit` on JAX
            model.optimizer.build(model.trainable_variables)
        failures = []
        for epoch, path in candidates:
            try:
                _load(model, path, epoch, steps_per_epoch)
            except Exception as err:
                failures.append(f"{os.path.basename(path)} ({type(err).__name__}: {err})")
                continue
            if failures:
                logger.info(f"warning: skipped damaged backup(s): {'; '.join(failures)}")
            self.truncate_log(epoch)
            return epoch
        raise ConfigError(
            f"no backup in {self.backup} can be loaded: {'; '.join(failures)}. Pass `resume=False` "
            "to start afresh (the damaged backups are then removed)."
        )

    def truncate_log(self, first_epoch):
        """Keeps the CSV rows of epochs before `first_epoch` (those the backup
        holds); a log that cannot be read is set aside, not lost."""
        if not os.path.exists(self.log_csv):
            return
        try:
            with open(self.log_csv, newline="") as f:
                rows = list(csv.reader(f))
            kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < first_epoch]
        except (OSError, ValueError, UnicodeDecodeError):
            kept_as = _set_aside(self.log_csv, "damaged")
            logger.info(f"warning: {self.log_csv} could not be read; kept as {kept_as}")
            return
        io.atomic_write_text(self.log_csv, "".join(",".join(r) + "\n" for r in kept))

    def write_backup(self, model, epochs_done):
        """Writes the backup after `epochs_done` epochs, whole or not at all, and
        keeps the newest `KEEP_BACKUPS`. The file is first a new temporary one,
        recorded before it is written, then renamed.

        Raises:
            ConfigError: the disk is full or the folder refuses the file (the
                previous backup is kept; the message says how to resume).
        """
        try:
            if os.path.islink(self.backup):
                raise OSError(f"{self.backup} became a symbolic link")
            os.makedirs(self.backup, exist_ok=True)
            final = backup_path(self.backup, epochs_done)
            recorded = _manifest(self.backup)
            with io.atomic_path(final, suffix=".weights.h5") as tmp:
                _record(self.backup, recorded | {os.path.basename(tmp)})  # before writing it
                model.save_weights(tmp)
            _record(self.backup, recorded | {os.path.basename(final)})
        except OSError as err:
            raise ConfigError(
                f"could not write the backup after epoch {epochs_done} to {self.backup} "
                f"({getattr(err, 'strerror', None) or err}); training stopped, the previous "
                "backup is kept. Free some space (or fix the cause) and re-run the same command: "
                "it resumes from the last backup."
            ) from None
        remove_backups(self.backup, keep=KEEP_BACKUPS)

    # === finish ===
    def finish(self, model, history, summary):
        """Writes the model (atomically), then `summary.json`, then drops the backups.

        A failure to write the model keeps the backups, so re-running the same
        command writes it without training again.

        Args:
            model: the trained model.
            history: `fit`'s `History`.
            summary: figures of the run for `summary.json`.

        Returns:
            `(logs, summary)`: the last epoch's logs and the summary written.
        """
        try:
            io.save_model_atomic(model, self.output)
        except OSError as err:
            raise ConfigError(
                f"could not write the model to {self.output} ({err.strerror or err}). The trained "
                f"weights are kept in {self.backup}: fix the cause and re-run the same command; it "
                "writes the model without training again."
            ) from None
        logs = self._final_logs(history)
        summary = {"complete": True, "output": self.output, **summary, **logs}
        io.atomic_write_text(self.summary_json, json.dumps(summary, indent=2) + "\n")
        remove_backups(self.backup)  # only once the model and the summary are safe
        return logs, summary

    def _final_logs(self, history):
        """The last epoch's logs: from `fit`, or from `log.csv` when `fit` had no
        epoch left to run (a run resumed after its last epoch)."""
        if history.history:
            return {k: float(v[-1]) for k, v in history.history.items()}
        try:
            with open(self.log_csv, newline="") as f:
                rows = list(csv.DictReader(f))
            return {k: float(v) for k, v in rows[-1].items() if k != "epoch" and v}
        except (OSError, IndexError, ValueError):
            return {}


def _load(model, path, epoch, steps_per_epoch):
    """Loads one backup; raises when it does not load or disagrees with its epoch."""
    model.load_weights(path)
    steps = int(ops.convert_to_numpy(model.optimizer.iterations))
    if steps != epoch * steps_per_epoch:
        raise ValueError(
            f"it holds {steps} optimizer steps, not the {epoch} x {steps_per_epoch} of its epoch"
        )


class EpochBackup(keras.callbacks.Callback):
    """Backs up a run after every epoch: the backup half of
    `keras.callbacks.BackupAndRestore` for a `RunDirectory` (whose `resume`,
    called before `fit`, is the restore half).

    After every epoch it writes the next backup (weights and optimizer state)
    to a temporary file renamed to `backup/epoch-NNNNN.weights.h5` (NNNNN =
    completed epochs), so a kill at any moment leaves the previous backups
    intact. Put it after the loggers (`RunDirectory.csv_logger`, which opens
    the log only when an epoch ends, after `resume` has trimmed it to the
    epochs the backup holds): an epoch's row is then written before its
    backup, so a kill between the two leaves a row the next run trims, never a
    backup without its row.

    Args:
        run: the `RunDirectory`.
        steps_per_epoch: optimizer steps per epoch.
        epochs: the run's epochs.
        scope: a context factory for creating variables (the `tf.distribute`
            strategy's `scope`).
    """

    def __init__(self, run, steps_per_epoch, epochs, scope=contextlib.nullcontext):
        super().__init__()
        self.run = run
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.scope = scope

    def on_epoch_end(self, epoch, logs=None):
        self.run.write_backup(self.model, epoch + 1)


class BestCheckpoint(keras.callbacks.Callback):
    """Keeps the model of the epoch with the best validation top-1 as the run
    directory's `best.keras` (`RunDirectory.best_model`), beside the last one
    (`--output`): written through a temporary file and a rename whenever an
    epoch's `val_top1` beats every earlier epoch's of the run (those in
    `log.csv` included, after a resume). Epochs without validation are skipped.
    It holds the network, without optimizer state (`evaluate.py` takes it).

    Args:
        run: the `RunDirectory`.
    """

    def __init__(self, run):
        super().__init__()
        self.run = run
        self.best = None

    def on_train_begin(self, logs=None):
        self.best = self.run.best_logged()

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(BEST_BY)
        if value is None or (self.best is not None and value <= self.best):
            return
        # the network alone (no optimizer state: during `fit` it holds the schedule)
        network = keras.Model(self.model.input, self.model.output, name=self.model.name)
        try:
            io.save_model_atomic(network, self.run.best_model)
        except OSError as err:
            raise ConfigError(
                f"could not write {self.run.best_model} ({err.strerror or err}); training "
                "stopped, the previous backup is kept. Free some space (or fix the cause) and "
                "re-run the same command: it resumes from the last backup."
            ) from None
        self.best = value


class CSVLog(keras.callbacks.CSVLogger):
    """`keras.callbacks.CSVLogger` that appends to its file, opens it when the
    first epoch ends (after a resume has trimmed it, whatever the order of the
    callbacks) and never writes through a symbolic link (`O_NOFOLLOW`)."""

    def on_train_begin(self, logs=None):
        self._close()

    def on_epoch_end(self, epoch, logs=None):
        if self.csv_file is None:
            self._open()
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        self._close()

    def _open(self):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.filename, flags, 0o644)
        except OSError as err:
            raise ConfigError(f"cannot write the log {self.filename}: {err.strerror}.") from None
        self.append_header = os.fstat(fd).st_size == 0
        self.csv_file = os.fdopen(fd, "a")

    def _close(self):
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.csv_file, self.writer, self.keys = None, None, None
