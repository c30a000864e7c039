"""train.py end to end: outputs, resume, exit codes and messages for bad input."""

import csv
import json
import os
import signal

import keras
import numpy as np
import pytest

import nam_keras
import train
from nam_keras.training import run_directory as rundir
from nam_keras.training.run_directory import RunDirectory

# step 0 runs at LR 0 (warmup), step 1 at 1e30: the weights blow up and the
# loss of step 2 (epoch 3) is NaN, after two good epochs are backed up.
DIVERGING = "--epochs 4 --steps-per-epoch 1 --lr 1e30 --lr-scaling none --warmup-steps 1".split()
DIVERGING += ["--val-freq", "0"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_main_end_to_end(tmp_path, tiny_args, run_script):
    assert train.main(tiny_args("--epochs", "2", "--steps-per-epoch", "2")) == 0
    model = keras.models.load_model(tmp_path / "run.keras")
    assert model.name == "resnet18_nam" and len(nam_keras.nam_layers(model)) == 8
    probs = keras.ops.softmax(model.predict(np.zeros((3, 32, 32, 3), "uint8"), verbose=0))
    assert probs.shape == (3, 100)
    rows = read_csv(tmp_path / "run" / "log.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    # lr logged after the last step of each epoch (steps 1 and 3), peak 0.1 * 8 / 128
    peak = 0.1 * 8 / 128
    assert float(rows[0]["lr"]) == pytest.approx(peak * 1 / 2000, rel=1e-5)
    assert float(rows[1]["lr"]) == pytest.approx(peak * 3 / 2000, rel=1e-5)
    assert {"loss", "top1", "top5", "val_loss", "val_top1", "val_top5"} <= set(rows[0])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["precision"] == "float32" and config["total_steps"] == 4
    assert config["peak_lr"] == pytest.approx(peak)
    assert os.listdir(tmp_path / "run" / "tensorboard")
    assert not (tmp_path / "run" / "backup").exists()  # removed once the model is saved
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


@pytest.mark.slow
def test_baseline_and_mixup(tmp_path, tiny_args, run_script):
    mixing = "--mixup 0.2 --cutmix 1.0 --val-freq 0".split()
    args = tiny_args("--baseline", "--epochs", "1", "--steps-per-epoch", "1", *mixing)
    assert train.main(args) == 0
    model = keras.models.load_model(tmp_path / "run.keras")
    assert model.name == "resnet18_plain" and not nam_keras.nam_layers(model)


@pytest.mark.slow
def test_kill_and_resume(tmp_path, tiny_args, run_script, interrupt_when):
    """SIGKILL after the first epoch; the same command then runs only the rest."""
    args = tiny_args("--epochs", "3", "--steps-per-epoch", "12", "--val-freq", "0")
    first = tmp_path / "run" / "backup" / "epoch-00001.weights.h5"
    code, _ = interrupt_when(args, first, signal.SIGKILL)
    assert code == -signal.SIGKILL, "training finished before it could be killed"
    done = max(epoch for epoch, _ in rundir.backups(tmp_path / "run" / "backup"))
    assert 1 <= done < 3
    assert not (tmp_path / "run.keras").exists()

    proc = run_script("train.py", args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert (
        f"resuming from the backup in {tmp_path / 'run' / 'backup'}: {done} of 3 epochs done" in out
    )
    ran = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert ran == [f"Epoch {e}/3" for e in range(done + 1, 4)]  # only the remaining epochs
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "log.csv")] == ["0", "1", "2"]
    model = keras.models.load_model(tmp_path / "run.keras")
    assert int(model.optimizer.iterations) == 36  # 3 epochs x 12 steps, as uninterrupted


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--epochs", "0"], "--epochs: expected a positive integer, received 0"),
        (["--nam", "--baseline"], "--baseline: not allowed with argument --nam"),
        (["--batch-size", "-3"], "--batch-size: expected a positive integer"),
        (["--sparsity", "-1"], "--sparsity: expected a number >= 0"),
        (["--depth", "20"], "--depth: invalid choice: 20"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], received -1"),
        (["--cutmix", "inf"], "argument --cutmix: expected a finite number >= 0, received inf"),
        (["--val-freq", "-2"], "argument --val-freq: expected an integer >= 0, received -2"),
        (["--momentum", "1"], "argument --momentum: expected a number in [0, 1), received 1.0"),
        (["--width", "100000"], "argument --width: expected a width in [1, 1024], received 100000"),
        (["--mixup", "inf"], "argument --mixup: expected a finite number >= 0, received inf"),
        (["--seed", str(2**32)], "argument --seed: expected an integer in [0, 4294967295]"),
    ],
)
def test_bad_flags_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_output(tmp_path, tiny_args, capsys):
    args = tiny_args("--epochs", "1")
    args[args.index("--output") + 1] = str(tmp_path / "missing" / "m.keras")
    assert train.main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    args[args.index("--output") + 1] = str(tmp_path)
    assert train.main(args) == 2
    assert "is a folder" in capsys.readouterr().err


def test_batch_not_divisible_by_replicas(tmp_path, tiny_args, run_script):
    proc = run_script(
        "train.py", [*tiny_args("--epochs", "1", "--cpu-replicas", "2"), "--batch-size", "7"]
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "--batch-size 7 (the global batch) is not divisible by the 2 replicas" in out


def test_nan_loss_stops_and_keeps_last_good_backup(tmp_path, tiny_args, capsys):
    args = tiny_args(*DIVERGING)
    assert train.main(args) == 1
    err = capsys.readouterr().err
    assert "the training loss became nan" in err and "epoch 3" in err
    backup = tmp_path / "run" / "backup"
    assert sorted(os.listdir(backup)) == [
        "epoch-00001.weights.h5",
        "epoch-00002.weights.h5",
        "written.json",
    ]
    assert not (tmp_path / "run.keras").exists()


def test_resume_refuses_a_different_run(tmp_path, tiny_args, capsys):
    args = tiny_args(*DIVERGING)
    assert train.main(args) == 1  # leaves a backup behind
    capsys.readouterr()
    assert train.main([*args, "--baseline"]) == 2
    assert "holds a backup of a different run" in capsys.readouterr().err


@pytest.mark.slow
def test_train_and_evaluate_on_a_local_archive(tmp_path, tiny_args, make_cifar_archive, capsys):
    """The real archive path end to end: --data-dir with a CIFAR-100 python archive."""
    import evaluate

    archive, _ = make_cifar_archive(tmp_path / "cifar-100-python.tar.gz", n_train=32, n_test=20)
    args = list(tiny_args("--epochs", "1", "--steps-per-epoch", "2"))
    args[args.index("synthetic")] = "cifar100"
    with pytest.warns(UserWarning, match="subset"):
        assert train.main([*args, "--data-dir", str(archive)]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_examples"] == 32 and config["data_dir"] == str(archive)
    with pytest.warns(UserWarning, match="subset"):
        assert (
            evaluate.main(
                [
                    str(tmp_path / "run.keras"),
                    "--data-dir",
                    str(archive),
                    "--json",
                    str(tmp_path / "r.json"),
                ]
            )
            == 0
        )
    assert json.loads((tmp_path / "r.json").read_text())["test"]["examples"] == 20


def test_batch_larger_than_the_training_split(tmp_path, tiny_args, capsys):
    args = tiny_args("--epochs", "1")
    args[args.index("--synthetic-size") + 1] = "4"
    assert train.main(args) == 2
    assert "batch_size 8 is larger than the 4 training examples" in capsys.readouterr().err


# ------------------------------------------------------------------ no lost work

TWO_EPOCHS = ["--epochs", "2", "--steps-per-epoch", "2", "--val-freq", "0"]


@pytest.mark.slow
def test_a_finished_run_is_never_trained_again_over_its_model(tmp_path, tiny_args, capsys):
    args = tiny_args(*TWO_EPOCHS)
    assert train.main(args) == 0
    model_path = tmp_path / "run.keras"
    stamp = model_path.stat().st_mtime_ns
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and summary["optimizer_steps"] == 4
    # what a kill while the backups were being deleted leaves behind: a recorded one
    (tmp_path / "run" / "backup").mkdir()
    (tmp_path / "run" / "backup" / "epoch-00002.weights.h5").write_bytes(b"cut")
    (tmp_path / "run" / "backup" / "written.json").write_text(
        '{"files": ["epoch-00002.weights.h5"]}'
    )
    capsys.readouterr()
    assert train.main(args) == 0
    assert "this run is complete (2 epochs" in capsys.readouterr().out
    assert model_path.stat().st_mtime_ns == stamp  # the trained model, untouched
    assert not (tmp_path / "run" / "backup").exists()  # the leftover is cleaned up
    assert train.main([*args, "--epochs", "1"]) == 2  # other settings: refused, not retrained
    assert "'epochs': (2, 1)" in capsys.readouterr().err
    assert model_path.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_a_damaged_backup_falls_back(
    tmp_path, tiny_args, run_script, interrupt_when
):
    args = tiny_args("--epochs", "4", "--steps-per-epoch", "6", "--val-freq", "0")
    second = tmp_path / "run" / "backup" / "epoch-00002.weights.h5"
    code, out = interrupt_when(args, second, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out
    assert "train.py: error: stopped by SIGTERM during epoch" in out
    assert "Re-run the same command to resume" in out
    backups = rundir.backups(tmp_path / "run" / "backup")
    newest_epoch, newest = backups[0]
    assert newest_epoch >= 2 and not (tmp_path / "run.keras").exists()
    with open(newest, "r+b") as f:  # as a Ctrl-C in the middle of writing it would leave it
        f.truncate(1000)
    proc = run_script("train.py", args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"skipped damaged backup(s): {os.path.basename(newest)}" in out
    assert f"{newest_epoch - 1} of 4 epochs done" in out
    model = keras.models.load_model(tmp_path / "run.keras")
    assert int(model.optimizer.iterations) == 24  # as an uninterrupted run


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixup_and_cutmix_under_mixed_precision(tiny_args, precision):
    args = tiny_args(
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--val-freq",
        "1",
        "--val-steps",
        "1",
        "--mixup",
        "0.2",
        "--cutmix",
        "1.0",
        "--precision",
        precision,
    )
    assert train.main(args) == 0


def test_a_backup_folder_it_did_not_write_is_left_alone(tmp_path, tiny_args, capsys):
    backup = tmp_path / "run" / "backup"
    backup.mkdir(parents=True)
    (backup / "epoch-00001.weights.h5").write_bytes(b"someone else's")
    assert train.main(tiny_args(*TWO_EPOCHS)) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert train.main(tiny_args(*TWO_EPOCHS, "--no-resume")) == 2
    assert "may not have been written by train.py" in capsys.readouterr().err
    assert (backup / "epoch-00001.weights.h5").read_bytes() == b"someone else's"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("config", "config.json (the run's settings) is damaged"),
        ("backup-file", "backup should be a folder"),
        ("backup-garbage", "no backup in"),
    ],
)
def test_a_damaged_run_directory_is_a_clear_error(tmp_path, tiny_args, capsys, damage, message):
    run = tmp_path / "run"
    if damage == "backup-garbage":  # a real run, then both backups damaged
        assert train.main(tiny_args(*TWO_EPOCHS)) == 0
        (run / "summary.json").unlink()
    run.mkdir(exist_ok=True)
    if damage == "backup-file":
        (run / "backup").write_text("")
    else:
        (run / "backup").mkdir()
        for epoch in (1, 2):
            (run / "backup" / f"epoch-{epoch:05d}.weights.h5").write_bytes(b"\x89HDF\r\n cut")
        names = [f"epoch-{epoch:05d}.weights.h5" for epoch in (1, 2)]
        (run / "backup" / "written.json").write_text(json.dumps({"files": names}))  # ours
    if damage == "config":
        (run / "config.json").write_text('{"written_by": "nam-keras train.py", "depth"')
    capsys.readouterr()
    assert train.main(tiny_args(*TWO_EPOCHS)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, tiny_args, capsys):
    run = RunDirectory.open(str(tmp_path / "run"), str(tmp_path / "run.keras"), {}, [])
    with run:
        assert train.main(tiny_args(*TWO_EPOCHS)) == 2
    assert "is in use by train.py (pid" in capsys.readouterr().err


def test_bad_paths_are_found_before_training(tmp_path, tiny_args, capsys):
    args = tiny_args(*TWO_EPOCHS)
    args[args.index("--output") + 1] = str(tmp_path / ("x" * 300 + ".keras"))
    assert train.main(args) == 2
    assert "its name is longer than the 255 bytes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing left behind


@pytest.mark.parametrize(
    "tf_config, message",
    [
        ("{not json", "TF_CONFIG is malformed"),
        ('{"cluster": {"worker": ["a:1", 5]}}', "every worker must be a 'host:port' string"),
        (
            '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 7}}',
            "task index 7 is not one of the 2 workers",
        ),
    ],
)
def test_a_malformed_tf_config_is_a_clear_error(tiny_args, capsys, monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    assert train.main(tiny_args(*TWO_EPOCHS)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_final_save_keeps_the_work_and_a_rerun_writes_the_model(
    tmp_path, tiny_args, capsys, monkeypatch
):
    from nam_keras import io

    def disk_full(model, path):
        raise OSError(28, "No space left on device")

    args = tiny_args(*TWO_EPOCHS)
    with monkeypatch.context() as patch:
        patch.setattr(io, "save_model_atomic", disk_full)
        assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "could not write the model to" in err and "No space left on device" in err
    assert "re-run the same command; it writes the model without training again" in err
    assert [e for e, _ in rundir.backups(tmp_path / "run" / "backup")] == [2, 1]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "2 of 2 epochs done" in out and "done: resnet18_nam, 2 epochs" in out
    model = keras.models.load_model(tmp_path / "run.keras")
    assert int(model.optimizer.iterations) == 4  # the trained weights, not a fresh model


def test_a_run_that_fails_at_start_leaves_no_run_directory(tmp_path, tiny_args, capsys):
    args = tiny_args(*TWO_EPOCHS, "--data-dir", str(tmp_path / "absent.tar.gz"))
    args[args.index("synthetic")] = "cifar100"
    assert train.main(args) == 2
    assert "absent.tar.gz: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
