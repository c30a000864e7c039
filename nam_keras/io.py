"""File helpers: files written so that a crash never leaves half of one (temp
file, then rename), paths checked before long work, JSON objects read with
clear errors."""

import contextlib
import json
import os
import tempfile

from nam_keras.errors import ConfigError


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary path next to `path`; renames it to `path` when the
    block succeeds and removes it otherwise, so `path` is always either the
    old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes 0600 files: give the result the permissions of any new
        # file, so that another user (a TF Serving process) can read it.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json_object(path, what=None, advice=""):
    """The JSON object in the file `path`, `None` when there is no such file.

    Args:
        path: the file.
        what: what the file is, for the messages (e.g. "the run's settings").
        advice: the end of every message (what the user can do).

    Raises:
        ConfigError: naming the file, when it cannot be read, is not JSON
            (nested too deeply included) or holds another JSON value.
    """
    if not os.path.exists(path):
        return None
    label = f"{path} ({what})" if what else path
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read {label} ({err.strerror or err}){advice}") from None
    except (ValueError, RecursionError) as err:
        deep = isinstance(err, RecursionError)
        reason = "RecursionError: nested too deeply" if deep else f"{type(err).__name__}: {err}"
        raise ConfigError(f"{label} is damaged ({reason}){advice}") from None
    if not isinstance(value, dict):
        kind = {list: "list", str: "string"}.get(type(value), "number or constant")
        raise ConfigError(f"{label} is a JSON {kind}, not an object{advice}")
    return value


def current_umask():
    """The process' umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path, text):
    """Writes `text` to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_model_atomic(model, path):
    """`model.save(path)` through a temporary `.keras` file and a rename."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def check_writable(path, what="a .keras file path"):
    """Raises `ConfigError` unless the file `path` can be written: its folder
    exists and takes new files, and its name is not too long for the file
    system. Checked before long work, so that it does not fail at the end.

    Args:
        path: the file to be written later.
        what: what `path` should be, for the message (e.g. "a .json file path").
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ConfigError(f"output path {path!r} is a folder; expected {what}.")
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {path!r}: folder {folder!r} does not exist.")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
        path_max = os.pathconf(folder, "PC_PATH_MAX")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        os.close(fd)
        os.remove(tmp)
    except OSError as err:
        raise ConfigError(f"cannot write {path!r}: {err.strerror}.") from None
    if len(os.fsencode(os.path.basename(path))) > name_max:
        raise ConfigError(
            f"cannot write {path!r}: its name is longer than the {name_max} bytes "
            "this file system allows."
        )
    if len(os.fsencode(os.path.abspath(path))) >= path_max:
        raise ConfigError(f"cannot write {path!r}: the path is longer than {path_max} bytes.")


def check_folder(path):
    """Raises `ConfigError` unless the folder `path` exists or can be created: the
    nearest existing folder above it is a folder that takes new entries, no part of
    the path is longer than the file system allows (`PC_NAME_MAX` bytes a name,
    `PC_PATH_MAX` the whole path) and no part of it is a file. Creates nothing.
    Returns the folders that `make_folder` would create, outermost first."""
    path = os.fspath(path)
    full = os.path.abspath(path)
    missing = []
    existing = full
    while not os.path.isdir(existing):
        if os.path.lexists(existing):
            what = "it" if existing == full else f"{existing!r}"
            raise ConfigError(f"cannot create folder {_shown(path)}: {what} is not a folder.")
        missing.append(existing)
        existing = os.path.dirname(existing)
    if not missing:
        return []
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except OSError as err:
        raise ConfigError(f"cannot create folder {_shown(path)}: {err.strerror}.") from None
    for folder in missing:
        name = os.path.basename(folder)
        if len(os.fsencode(name)) > name_max:
            shown = name if len(name) <= 40 else name[:37] + "..."
            raise ConfigError(
                f"cannot create folder {_shown(path)}: the name {shown!r} is longer than the "
                f"{name_max} bytes this file system allows."
            )
    if len(os.fsencode(full)) >= path_max:
        raise ConfigError(
            f"cannot create folder {_shown(path)}: the path is longer than {path_max} bytes."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create folder {_shown(path)}: {existing!r} is not writable.")
    return missing[::-1]


def make_folder(path):
    """`os.makedirs(path, exist_ok=True)`, checked first (`check_folder`) so that a
    path that cannot be created creates nothing; `ConfigError` naming the folder.
    Should creating fail half-way anyway, the folders this call created are removed."""
    created = []
    try:
        for folder in check_folder(path):
            try:
                os.mkdir(folder)
            except FileExistsError:  # made meanwhile by another process
                if not os.path.isdir(folder):
                    raise
                continue
            created.append(folder)
    except OSError as err:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise ConfigError(f"cannot create folder {_shown(path)}: {err.strerror or err}.") from None


def _shown(path, limit=120):
    """`repr(path)`, its middle cut when it is long (a message stays readable)."""
    text = repr(os.fspath(path))
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"
