"""Files written so that a crash never leaves half of one: temp file, then rename."""

import contextlib
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    """Writes `text` to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_model_atomic(model, path):
    """`model.save(path)` through a temporary `.keras` file and a rename."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def check_writable(path):
    """Raises `ConfigError` unless a file can be created next to `path`."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ConfigError(f"output path {path!r} is a folder; expected a .keras file path.")
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {path!r}: folder {folder!r} does not exist.")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        os.close(fd)
        os.remove(tmp)
    except OSError as err:
        raise ConfigError(f"cannot write {path!r}: {err.strerror}.") from None
