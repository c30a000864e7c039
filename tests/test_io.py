"""Atomic writes and the writability check."""

import os

import pytest

from nam_keras import io
from nam_keras.errors import ConfigError


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a.txt"
    io.atomic_write_text(path, "first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "first"  # the old file, untouched
    assert os.listdir(tmp_path) == ["a.txt"]  # no temporary file left


def test_check_writable(tmp_path):
    io.check_writable(tmp_path / "m.keras")
    with pytest.raises(ConfigError, match="is a folder"):
        io.check_writable(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        io.check_writable(tmp_path / "missing" / "m.keras")
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        io.atomic_write_text(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    finally:
        os.umask(old)


def test_check_writable_refuses_names_the_file_system_cannot_hold(tmp_path):
    with pytest.raises(ConfigError, match="its name is longer than the 255 bytes"):
        io.check_writable(tmp_path / ("x" * 300 + ".keras"))
    with pytest.raises(ConfigError, match=r"expected a \.json file path"):
        io.check_writable(tmp_path, "a .json file path")
