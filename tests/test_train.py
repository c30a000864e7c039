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


#: A run short enough for tests that compare interrupted runs with an uninterrupted one.
EXACT = ["--epochs", "3", "--steps-per-epoch", "6", "--val-steps", "1"]


def same_run(rows, weights, reference):
    """The log rows (but the timing) and the final weights are the reference's: the
    same epochs and learning rates, every figure and weight equal to float32 rounding.
    (Usually bitwise on TensorFlow's CPU; its multi-threaded kernels may sum in
    another order when the machine is loaded, a 1e-7 relative difference. Another
    batch or augmentation draw would change the losses in their third digit.)"""
    want_rows, want_weights = reference
    assert [(r["epoch"], r["lr"]) for r in rows] == [(r["epoch"], r["lr"]) for r in want_rows]
    for got, want in zip(rows, want_rows):
        assert set(got) == set(want)
        for key in set(got) - {"epoch", "lr", "train_images_per_s"}:
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-7), key
    assert len(weights) == len(want_weights)
    for got, want in zip(weights, want_weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """`(log rows, final weights)` of the EXACT run without interruption."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("uninterrupted")
    args = [*TINY, *EXACT, "--run-dir", str(root / "run"), "--output", str(root / "m.keras")]
    assert train.main(args) == 0
    weights = keras.models.load_model(root / "m.keras").get_weights()
    return read_csv(root / "run" / "log.csv"), weights


class Killed(BaseException):
    """What a SIGKILL does to a process, in-process: nothing after it runs."""


class Interrupt(keras.callbacks.Callback):
    """SIGTERM to this process after batch `batch` of epoch `epoch` (0-based), or,
    with `batch=None`, a kill just after that epoch's backup."""

    def __init__(self, epoch, batch=None):
        super().__init__()
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, batch, logs=None):
        if (self._epoch, batch) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.batch is None and epoch == self.epoch:
            raise Killed


def test_interrupted_runs_resume_exactly(tmp_path, tiny_args, monkeypatch, uninterrupted, capsys):
    """SIGTERM in the middle of epoch 2, then a kill just after epoch 3's backup:
    each resume sees the batches and augmentation draws of an uninterrupted run,
    so the log rows and the final weights are those of one (`same_run`)."""
    from nam_keras.training import experiment

    args = tiny_args(*EXACT)
    make = experiment.make_callbacks
    for interrupt in (Interrupt(1, batch=2), Interrupt(2)):  # after EpochBackup
        monkeypatch.setattr(experiment, "make_callbacks", lambda *a, i=interrupt: [*make(*a), i])
        if interrupt.batch is None:
            with pytest.raises(Killed):
                train.main(args)
        else:
            assert train.main(args) == 128 + signal.SIGTERM
            err = capsys.readouterr().err
            assert "train.py: error: stopped by SIGTERM during epoch 2" in err
            assert "Re-run the same command to resume" in err
    monkeypatch.setattr(experiment, "make_callbacks", make)
    assert train.main(args) == 0
    assert "3 of 3 epochs done" in capsys.readouterr().out  # nothing left but to save
    weights = keras.models.load_model(tmp_path / "run.keras").get_weights()
    same_run(read_csv(tmp_path / "run" / "log.csv"), weights, uninterrupted)


@pytest.mark.slow
def test_kill_and_resume(tmp_path, tiny_args, interrupt_when, uninterrupted, capsys):
    """SIGKILL of a train.py process after the first epoch; the same command then
    runs only the rest, and ends as the uninterrupted run. (The kill needs a
    process of its own; the resume runs `train.main` here: only the files the
    killed process left behind carry over.)"""
    args = tiny_args(*EXACT)
    first = tmp_path / "run" / "backup" / "epoch-00001.weights.h5"
    code, _ = interrupt_when(args, first, signal.SIGKILL)
    assert code == -signal.SIGKILL, "training finished before it could be killed"
    done = max(epoch for epoch, _ in rundir.backups(tmp_path / "run" / "backup"))
    assert 1 <= done < 3
    assert not (tmp_path / "run.keras").exists()

    capsys.readouterr()
    code = train.main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (
        f"resuming from the backup in {tmp_path / 'run' / 'backup'}: {done} of 3 epochs done" in out
    )
    ran = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert ran == [f"Epoch {e}/3" for e in range(done + 1, 4)]  # only the remaining epochs
    model = keras.models.load_model(tmp_path / "run.keras")
    assert int(model.optimizer.iterations) == 18  # 3 epochs x 6 steps, as uninterrupted
    same_run(read_csv(tmp_path / "run" / "log.csv"), model.get_weights(), uninterrupted)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--epoch", "1"], "unrecognized arguments: --epoch 1 (did you mean --epochs?)"),
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


@pytest.mark.slow
def test_train_and_evaluate_on_a_local_archive(tmp_path, tiny_args, make_cifar_archive, capsys):
    """The real archive path end to end: --data-dir with a CIFAR-100 python archive.
    (evaluate.py reads its test split: no validation in training.)"""
    import evaluate

    archive, _ = make_cifar_archive(tmp_path / "cifar-100-python.tar.gz", n_train=32, n_test=20)
    args = list(tiny_args("--epochs", "1", "--steps-per-epoch", "2", "--val-freq", "0"))
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
    args = tiny_args("--baseline", *TWO_EPOCHS)  # the quickest network to train: not the point
    if damage == "backup-garbage":  # a real run, then both backups damaged
        assert train.main(args) == 0
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
    assert train.main(args) == 2
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

    args = tiny_args("--baseline", *TWO_EPOCHS)  # the quickest network to train: not the point
    with monkeypatch.context() as patch:
        patch.setattr(io, "save_model_atomic", disk_full)
        assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "could not write the model to" in err and "No space left on device" in err
    assert "re-run the same command; it writes the model without training again" in err
    assert [e for e, _ in rundir.backups(tmp_path / "run" / "backup")] == [2, 1]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "2 of 2 epochs done" in out and "done: resnet18_plain, 2 epochs" in out
    model = keras.models.load_model(tmp_path / "run.keras")
    assert int(model.optimizer.iterations) == 4  # the trained weights, not a fresh model


def test_a_run_that_fails_at_start_leaves_no_run_directory(tmp_path, tiny_args, capsys):
    args = tiny_args(*TWO_EPOCHS, "--data-dir", str(tmp_path / "absent.tar.gz"))
    args[args.index("synthetic")] = "cifar100"
    assert train.main(args) == 2
    assert "absent.tar.gz: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ run lifecycle


def tensorboard_tags(folder):
    import glob

    import tensorflow as tf

    events = glob.glob(str(folder / "*" / "events.*"))
    return {
        v.tag
        for f in events
        for e in tf.compat.v1.train.summary_iterator(f)
        for v in e.summary.value
    }


@pytest.mark.slow
def test_a_finished_run_is_a_record_kept_whole_until_extended(tmp_path, tiny_args, capsys):
    args = tiny_args("--epochs", "1", "--steps-per-epoch", "2", "--val-steps", "1")
    assert train.main(args) == 0
    best = tmp_path / "run" / "best.keras"
    assert keras.models.load_model(best).count_params() > 0  # the one epoch: the best so far
    model_path = tmp_path / "run.keras"
    stamp = model_path.stat().st_mtime_ns
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and summary["optimizer_steps"] == 2
    # what a kill while the backups were being deleted leaves behind: a recorded one
    (tmp_path / "run" / "backup").mkdir()
    (tmp_path / "run" / "backup" / "epoch-00001.weights.h5").write_bytes(b"cut")
    (tmp_path / "run" / "backup" / "written.json").write_text(
        '{"files": ["epoch-00001.weights.h5"]}'
    )
    capsys.readouterr()
    assert train.main(args) == 0
    assert "this run is complete (1 epochs" in capsys.readouterr().out
    assert model_path.stat().st_mtime_ns == stamp  # the trained model, untouched
    assert not (tmp_path / "run" / "backup").exists()  # the leftover is cleaned up
    assert train.main([*args, "--epochs", "2"]) == 2  # other settings: refused, not retrained
    err = capsys.readouterr().err
    assert "'epochs': (1, 2)" in err and "pass --extend to give it more --epochs" in err
    assert train.main([*args, "--epochs", "1", "--extend"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 1 with --extend: the finished run in" in err
    assert "has 1 epochs; expected more than 1 epochs" in err
    assert model_path.stat().st_mtime_ns == stamp

    assert train.main([*args, "--epochs", "2", "--extend"]) == 0
    assert "extending the finished run in" in capsys.readouterr().out
    model = keras.models.load_model(model_path)
    assert int(model.optimizer.iterations) == 4  # the first epoch's steps kept, 2 more
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "log.csv")] == ["0", "1"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["total_steps"] == 4 and config["extended_from_epochs"] == 1
    tags = tensorboard_tags(tmp_path / "run" / "tensorboard")
    assert "epoch_lr" in tags and "epoch_learning_rate" not in tags  # the LR once
    assert {"epoch_loss", "epoch_sparsity_penalty"} <= tags


def test_initial_checkpoint_and_config_file(tmp_path, tiny_args, trained_model, capsys):
    from nam_keras import cli
    from nam_keras.config import TrainConfig

    trained = keras.models.load_model(trained_model)  # TINY, batch 16, 1 epoch of 2 steps
    args = tiny_args(*TWO_EPOCHS, "--lr", "0", "--initial-checkpoint", str(trained_model))
    assert train.main([*args, "--epochs", "1"]) == 0
    assert "starting from the weights of" in capsys.readouterr().out
    model = keras.models.load_model(tmp_path / "run.keras")
    assert int(model.optimizer.iterations) == 2  # the optimizer started afresh
    for got, want in zip(model.trainable_weights, trained.trainable_weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())  # learning rate 0
    assert train.main([*args, "--width", "8", "--run-dir", str(tmp_path / "w8")]) == 2
    err = capsys.readouterr().err
    assert "--initial-checkpoint" in err and "not the network of this run" in err
    assert train.main([*tiny_args("--initial-checkpoint", str(tmp_path / "no.keras"))]) == 2
    assert "no.keras: no such file; expected a .keras file" in capsys.readouterr().err

    recorded = str(tmp_path / "run" / "config.json")
    again = cli.parse_config(TrainConfig, ["--config", recorded, "--lr", "0.5"], "train.py", "")
    assert (again.depth, again.width, again.epochs, again.lr) == (18, 4, 1, 0.5)
    assert again.synthetic_size == (64, 16) and again.initial_checkpoint == str(trained_model)
    (tmp_path / "other.json").write_text('{"depth": 18}')
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(tmp_path / "other.json")])
    assert exit_info.value.code == 2
    assert "other.json was not written by train.py" in capsys.readouterr().err


def test_nan_loss_stops_and_a_different_run_is_refused_in_flags_or_python_words(
    tmp_path, tiny_args, monkeypatch, capsys
):
    """A NaN loss keeps the last good backup; resuming it as another run is refused,
    naming flags on the command line and `TrainConfig` arguments from Python, where
    the progress lines are printed too."""
    import logging

    from nam_keras.config import TrainConfig
    from nam_keras.errors import ConfigError
    from nam_keras.training import experiment

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
    assert train.main([*args, "--baseline"]) == 2
    err = capsys.readouterr().err
    assert "holds a backup of a different run" in err
    assert "pass --no-resume to start afresh or choose another --run-dir" in err
    config = TrainConfig(
        dataset="synthetic", synthetic_size=(64, 16), depth=18, width=4, batch_size=8,
        epochs=4, steps_per_epoch=1, val_freq=0, run_dir=str(tmp_path / "run"),
        output=str(tmp_path / "run.keras"), model="baseline", verbose=2,
    )  # fmt: skip
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # no logging set up
    monkeypatch.setattr(logging.getLogger("nam_keras"), "handlers", [])
    message = "pass `resume=False` to start afresh or choose another `run_dir`"
    with pytest.raises(ConfigError, match=message):
        experiment.train(config)
    assert "[nam-keras] device: CPU" in capsys.readouterr().out
