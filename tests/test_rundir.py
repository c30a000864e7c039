"""The run directory: lock, ownership, whole backups, resuming, starting afresh."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple

import keras
import numpy as np
import pytest

from nam_keras import NAMAttention, batch_normalization
from nam_keras.errors import ConfigError
from nam_keras.training import run_directory
from nam_keras.training.optimizers import TorchSGD
from nam_keras.training.run_directory import RunDirectory

STEPS = 2  # steps per epoch of the tiny fits below
Usage = namedtuple("Usage", "free")


@pytest.fixture
def paths(tmp_path):
    """A run directory's folder, made but not opened (the methods under test directly)."""
    os.makedirs(tmp_path / "run")
    return RunDirectory(tmp_path / "run", tmp_path / "m.keras")


def opened(paths, resume=True, settings=None):
    """`RunDirectory.open` on the folder of `paths`."""
    return RunDirectory.open(paths.run_dir, paths.output, settings or {}, [], resume=resume)


def tiny_model(seed=0):
    """A conv, one of our BNs, NAM and a classifier: seconds to build and fit."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = batch_normalization("bn")(x)
    x = NAMAttention()(x)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=TorchSGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(True))
    return model


def fit_with_backups(model, paths, epochs):
    x = np.random.default_rng(0).integers(0, 255, (8 * STEPS, 8, 8, 3)).astype("float32")
    y = np.arange(8 * STEPS) % 10
    backup = paths.callback(STEPS, epochs)
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=[backup])
    return model


def test_unrecorded_backups_are_neither_read_nor_deleted(paths):
    os.makedirs(paths.backup)
    planted = run_directory.backup_path(paths.backup, 1)
    with open(planted, "wb") as f:
        f.write(b"someone else's")
    assert paths.restore(tiny_model(), 5, STEPS) is None
    run_directory.remove_backups(paths.backup)
    assert os.listdir(paths.backup) == ["epoch-00001.weights.h5"]


def test_epoch_backups_are_whole_named_by_epoch_and_two_are_kept(paths):
    fit_with_backups(tiny_model(), paths, epochs=3)
    backups = sorted(os.listdir(paths.backup))
    assert backups == ["epoch-00002.weights.h5", "epoch-00003.weights.h5", "written.json"]
    assert [e for e, _ in run_directory.backups(paths.backup)] == [3, 2]


def test_restore_loads_weights_and_optimizer_state(paths):
    trained = fit_with_backups(tiny_model(), paths, epochs=2)
    fresh = tiny_model(seed=1)
    assert paths.restore(fresh, 5, STEPS) == 2
    assert int(fresh.optimizer.iterations) == 2 * STEPS
    for a, b in zip(fresh.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_newest_backup_falls_back_to_the_previous(paths, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("nam_keras"), "propagate", True)  # to caplog
    caplog.set_level(logging.INFO, logger="nam_keras")
    fit_with_backups(tiny_model(), paths, epochs=2)
    newest = run_directory.backup_path(paths.backup, 2)
    with open(newest, "r+b") as f:  # as a kill in the middle of writing it would
        f.truncate(os.path.getsize(newest) // 3)
    fresh = tiny_model(seed=1)
    assert paths.restore(fresh, 5, STEPS) == 1
    assert int(fresh.optimizer.iterations) == STEPS
    assert "skipped damaged backup(s): epoch-00002.weights.h5" in caplog.text


def test_no_loadable_backup_is_refused_naming_no_resume(paths):
    os.makedirs(paths.backup)
    for epoch in (1, 2):
        with open(run_directory.backup_path(paths.backup, epoch), "wb") as f:
            f.write(b"not hdf5")
    run_directory.adopt_earlier_backups(paths.backup)  # recorded as ours, damaged
    with pytest.raises(ConfigError, match=r"no backup in .* can be loaded: .*`resume=False`"):
        paths.restore(tiny_model(), 5, STEPS)


def test_a_backup_whose_step_count_disagrees_with_its_epoch_is_not_trusted(paths):
    fit_with_backups(tiny_model(), paths, epochs=1)
    os.rename(
        run_directory.backup_path(paths.backup, 1), run_directory.backup_path(paths.backup, 3)
    )
    os.remove(os.path.join(paths.backup, run_directory.MANIFEST))
    run_directory.adopt_earlier_backups(paths.backup)  # recorded as ours, wrongly named
    with pytest.raises(ConfigError, match=r"holds 2 optimizer steps, not the 3 x 2"):
        paths.restore(tiny_model(), 5, STEPS)


def test_a_backup_beyond_the_epochs_is_refused(paths):
    fit_with_backups(tiny_model(), paths, epochs=2)
    with pytest.raises(ConfigError, match=r"after 2 epochs, outside 0..1 .*`epochs=2`"):
        paths.restore(tiny_model(), 1, STEPS)


def test_keras_backup_of_earlier_versions_is_read(paths):
    fit_with_backups(tiny_model(), paths, epochs=1)
    os.rename(
        run_directory.backup_path(paths.backup, 1), os.path.join(paths.backup, "latest.weights.h5")
    )
    with open(os.path.join(paths.backup, "training_metadata.json"), "w") as f:
        json.dump({"epoch": 1, "batch": 0}, f)
    os.remove(os.path.join(paths.backup, run_directory.MANIFEST))  # as an earlier version left it
    run_directory.adopt_earlier_backups(paths.backup)  # what opening its run directory does
    assert paths.restore(tiny_model(seed=1), 3, STEPS) == 1
    for damaged in ("{broken", "{}", '{"epoch": "x"}'):
        with open(os.path.join(paths.backup, "training_metadata.json"), "w") as f:
            f.write(damaged)
        assert run_directory.backups(paths.backup) == []  # ignored, never a traceback


def test_lock_refuses_a_second_holder_and_frees_on_kill(paths):
    with (
        opened(paths),
        pytest.raises(ConfigError, match=r"is in use by train.py \(pid"),
        opened(paths),
    ):
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        from nam_keras.training.run_directory import RunDirectory
        import time
        with RunDirectory.open({paths.run_dir!r}, "m.keras", {{}}, []):
            print("locked", flush=True)
            time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match="is in use"), opened(paths):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with opened(paths):  # a killed holder leaves nothing stuck
        pass


def test_start_afresh_keeps_the_old_log_and_foreign_files(paths):
    fit_with_backups(tiny_model(), paths, epochs=1)
    with open(paths.config_json, "w") as f:
        json.dump({run_directory.OWNER_KEY: run_directory.OWNER}, f)
    with open(paths.log_csv, "w") as f:
        f.write("epoch,loss\n0,1.0\n")
    with open(os.path.join(paths.backup, "notes.txt"), "w") as f:
        f.write("mine")
    with opened(paths, resume=False):
        pass
    assert os.listdir(paths.backup) == ["notes.txt"]  # only our backups are gone
    kept = [n for n in os.listdir(paths.run_dir) if n.startswith("log-previous-")]
    assert len(kept) == 1 and not os.path.exists(paths.log_csv)


def test_start_afresh_refuses_a_backup_it_did_not_write(paths):
    fit_with_backups(tiny_model(), paths, epochs=1)  # no config.json of ours
    with (
        pytest.raises(ConfigError, match=r"may not have been written by train\.py"),
        opened(paths, resume=False),
    ):
        pass
    assert run_directory.backups(paths.backup)


def test_truncate_log_keeps_the_epochs_the_backup_holds_and_sets_garbage_aside(paths):
    with open(paths.log_csv, "w") as f:
        f.write("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")
    paths.truncate_log(2)
    with open(paths.log_csv) as f:
        assert f.read() == "epoch,loss\n0,1.0\n1,0.9\n"
    with open(paths.log_csv, "wb") as f:
        f.write(b"\xff\xfe garbage \x00\n")
    paths.truncate_log(2)
    assert not os.path.exists(paths.log_csv)
    assert [n for n in os.listdir(paths.run_dir) if n.startswith("log-damaged-")]


@pytest.mark.parametrize("content", ["{trunc", "[1, 2]"])
def test_damaged_settings_are_a_clear_error(paths, content):
    with open(paths.config_json, "w") as f:
        f.write(content)
    with pytest.raises(ConfigError, match=r"config.json \(the run's settings\) .*`resume=False`"):
        paths.check_resumable({"depth": 18}, ["depth"])


def test_check_resumable_names_what_changed(paths):
    with open(paths.config_json, "w") as f:
        json.dump({"depth": 18, "lr": 0.1}, f)
    paths.check_resumable({"depth": 18, "lr": 0.1}, ["depth", "lr"])
    with pytest.raises(ConfigError, match=r"'lr': \(0.1, 0.5\)"):
        paths.check_resumable({"depth": 18, "lr": 0.5}, ["depth", "lr"])


def test_a_backup_that_is_a_file_is_refused(paths):
    with open(paths.backup, "w") as f:
        f.write("")
    with pytest.raises(ConfigError, match=r"backup should be a folder"), opened(paths):
        pass


def test_not_enough_disk_space_is_found_at_start(paths, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(run_directory.shutil, "disk_usage", lambda folder: Usage(free=1000))
    with pytest.raises(ConfigError, match=r"only 0 MB free in .* need about \d+ MB"):
        paths.check_free_space(model)


def test_completed_needs_the_summary_and_the_model(paths):
    assert paths.completed() is None
    with open(paths.summary_json, "w") as f:
        json.dump({"complete": True, "output": paths.output}, f)
    assert paths.completed() is None  # the model is gone: not complete
    with open(paths.output, "w") as f:
        f.write("")
    assert paths.completed()["complete"] is True
