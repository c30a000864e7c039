"""The run directory is ours alone: links and files someone else put there.

Every name `train.py` writes is planted as a symbolic link to a sibling folder,
or as a file of the user's; the run must refuse, change nothing outside its
folder and lose nothing of the user's. Then finished runs as records, a
damaged final model and a full disk during a backup.
"""

import errno
import hashlib
import json
import os

import keras
import pytest

import train

# The plain ResNet: the network plays no part in the run directory, and it is the
# quickest to build and trace (a third less than NAM's for each run that trains).
ONE_EPOCH = ["--baseline", "--epochs", "1", "--steps-per-epoch", "1", "--val-freq", "0"]
TWO_EPOCHS = ["--baseline", "--epochs", "2", "--steps-per-epoch", "1", "--val-freq", "0"]

#: Every name the run writes in its folder, and what a link there points at.
WRITTEN = {
    ".lock": "file",
    "config.json": "file",
    "log.csv": "file",
    "summary.json": "file",
    "backup": "folder",
    "tensorboard": "folder",
    "tensorboard/train": "folder",
    "tensorboard/validation": "folder",
    "backup/epoch-00001.weights.h5": "file",
    "backup/written.json": "file",
}


def snapshot(folder):
    """{relative path: sha256 of a file, or the target of a link} under `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):  # does not descend into linked folders
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            if os.path.islink(path):
                out[os.path.relpath(path, folder)] = "-> " + os.readlink(path)
                continue
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def outside(tmp_path):
    """A sibling folder with the files an attacker would like us to overwrite or delete."""
    root = tmp_path / "outside"
    (root / "folder").mkdir(parents=True)
    (root / "victim.txt").write_text("precious\n")
    for name in ("training_metadata.json", "latest.weights.h5.bkp", ".tmp-abc", "written.json"):
        (root / "folder" / name).write_text(f"someone's {name}\n")
    (root / "folder" / "epoch-00001.weights.h5").write_text("not ours\n")
    return root


@pytest.mark.parametrize("planted", ["one at a time", "all at once"])
def test_links_where_the_run_writes_are_refused_and_nothing_outside_changes(
    tmp_path, tiny_args, capsys, outside, planted
):
    """Each name the run writes, as a link to a sibling folder's file or folder:
    refused before anything is opened, every link named, nothing outside changed.
    One at a time for the names directly in the run directory (each must be
    caught by itself), then every file name and those inside `backup/` and
    `tensorboard/` at once (one run names them all)."""
    top = [n for n in sorted(WRITTEN) if "/" not in n]
    inside = [n for n in sorted(WRITTEN) if "/" in n or WRITTEN[n] == "file"]  # real folders
    groups = [[n] for n in top] if planted == "one at a time" else [inside]
    for i, entries in enumerate(groups):
        name = f"run{i}"
        links = [tmp_path / name / entry for entry in entries]
        for entry, link in zip(entries, links):
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(outside / ("folder" if WRITTEN[entry] == "folder" else "victim.txt"), link)
        before = snapshot(outside)
        assert train.main(tiny_args(*ONE_EPOCH, name=name)) == 2
        err = capsys.readouterr().err
        assert "holds symbolic links where train.py writes" in err and "Traceback" not in err
        assert all(str(link) in err for link in links), (entries, err)
        assert snapshot(outside) == before
        assert all(os.path.islink(link) for link in links)  # left as they were
        assert not (tmp_path / f"{name}.keras").exists()


@pytest.mark.parametrize("resume", [True, False])
def test_files_train_py_did_not_write_are_refused_and_kept(tmp_path, tiny_args, capsys, resume):
    files = {"config.json": '{"my": "settings"}\n', "log.csv": "a,b\n1,2\n", "summary.json": "{}\n"}
    for i, (name, content) in enumerate(files.items()):  # each alone is refused
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / name).write_text(content)
        extra = [] if resume else ["--no-resume"]
        assert train.main(tiny_args(*ONE_EPOCH, *extra, name=f"run{i}")) == 2
        err = capsys.readouterr().err
        assert f"holds {name} that train.py did not write" in err
        assert (run / name).read_text() == content
        assert os.listdir(run) == [name]  # not even the lock file is left behind


def test_a_damaged_settings_file_is_kept_when_starting_afresh(tmp_path, tiny_args, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"written_by": "nam-keras train.py", "dep')
    assert train.main(tiny_args(*ONE_EPOCH)) == 2  # resuming: it says it is damaged
    assert "config.json (the run's settings) is damaged" in capsys.readouterr().err
    assert train.main(tiny_args(*ONE_EPOCH, "--no-resume")) == 0
    kept = [n for n in os.listdir(run) if n.startswith("config-damaged-")]
    assert len(kept) == 1 and (run / kept[0]).read_text().endswith('"dep')


@pytest.mark.slow
def test_a_finished_run_is_a_record(tmp_path, tiny_args, capsys):
    run, model = tmp_path / "run", tmp_path / "run.keras"
    assert train.main(tiny_args(*ONE_EPOCH)) == 0
    record = snapshot(run)
    capsys.readouterr()
    other_output = [*tiny_args(*ONE_EPOCH), "--output", str(tmp_path / "other.keras")]
    for args, changed in [
        (other_output, "'output'"),
        (tiny_args(*ONE_EPOCH, "--lr", "0.5"), "'lr'"),
        (tiny_args(*TWO_EPOCHS), "'epochs'"),
    ]:
        assert train.main(args) == 2
        err = capsys.readouterr().err
        assert "holds a finished run" in err and changed in err and "--no-resume" in err
    assert snapshot(run) == record  # nothing written, nothing trained
    assert not (tmp_path / "other.keras").exists()
    assert train.main(tiny_args(*ONE_EPOCH)) == 0  # the same command: nothing to do
    assert "this run is complete" in capsys.readouterr().out

    model.write_bytes(b"PK\x03\x04 damaged")  # a damaged model names the way out
    assert train.main(tiny_args(*ONE_EPOCH)) == 2
    err = capsys.readouterr().err
    assert "the model of the finished run" in err and "cannot be loaded" in err
    assert "--no-resume" in err and "Traceback" not in err

    model.unlink()  # a missing model: still a record, not trained again
    assert train.main(tiny_args(*ONE_EPOCH, "--lr", "0.5")) == 2
    err = capsys.readouterr().err
    assert "holds a finished run whose model" in err and "is missing" in err
    assert snapshot(run) == record
    assert train.main(tiny_args(*ONE_EPOCH, "--no-resume")) == 0
    keras.models.load_model(model)


@pytest.mark.slow
def test_a_full_disk_during_a_backup_stops_clearly_and_the_rerun_resumes(
    tmp_path, tiny_args, capsys, monkeypatch
):
    save = keras.Model.save_weights
    calls = []

    def full_after_the_first(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", full_after_the_first)
    assert train.main(tiny_args(*TWO_EPOCHS)) == 2
    err = capsys.readouterr().err
    assert "could not write the backup after epoch 2" in err
    assert "No space left on device" in err and "re-run the same command" in err
    backup = tmp_path / "run" / "backup"
    assert sorted(os.listdir(backup)) == ["epoch-00001.weights.h5", "written.json"]
    monkeypatch.setattr(keras.Model, "save_weights", save)
    assert train.main(tiny_args(*TWO_EPOCHS)) == 0
    assert "resuming from the backup" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2


# Only recorded backups are read or deleted: tests/test_rundir.py
# (test_unrecorded_backups_are_neither_read_nor_deleted).


def test_a_lock_file_train_py_did_not_write_is_refused_and_kept(tmp_path, tiny_args, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("my notes\n")
    assert train.main(tiny_args(*ONE_EPOCH)) == 2
    assert "is not a lock file of train.py" in capsys.readouterr().err
    assert (run / ".lock").read_text() == "my notes\n"
