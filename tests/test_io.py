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


def test_make_folder_checks_the_path_before_creating_anything(tmp_path):
    """A 5,000-character --run-dir was refused only after 20 nested folders were made."""
    deep = tmp_path.joinpath(*["d" * 240] * 21)  # every name fits, the path does not
    with pytest.raises(ConfigError, match=r"the path is longer than 4096 bytes"):
        io.make_folder(deep)
    assert os.listdir(tmp_path) == []
    long_name = tmp_path / "a" / "b" / ("x" * 300) / "c"
    with pytest.raises(ConfigError, match=r"the name 'x{37}\.\.\.' is longer than the 255 bytes"):
        io.make_folder(long_name)
    assert os.listdir(tmp_path) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"is not a folder"):
        io.make_folder(tmp_path / "f" / "sub" / "run")
    with pytest.raises(ConfigError, match=r"it is not a folder"):
        io.make_folder(tmp_path / "f")
    assert os.listdir(tmp_path) == ["f"]
    io.make_folder(tmp_path / "a" / "b")
    io.make_folder(tmp_path / "a" / "b")  # exists: fine
    assert (tmp_path / "a" / "b").is_dir()


def test_make_folder_removes_the_folders_it_made_when_it_fails_half_way(tmp_path, monkeypatch):
    (tmp_path / "keep").mkdir()
    mkdir, calls = os.mkdir, []

    def failing_mkdir(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", path)
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(io.os, "mkdir", failing_mkdir)
    with pytest.raises(ConfigError, match=r"cannot create folder .*: No space left on device"):
        io.make_folder(tmp_path / "keep" / "a" / "b" / "c" / "d")
    monkeypatch.undo()
    assert len(calls) == 3
    assert os.listdir(tmp_path) == ["keep"] and os.listdir(tmp_path / "keep") == []
