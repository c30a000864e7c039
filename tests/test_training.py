"""train.py end to end: schedule, optimizer, outputs, resume, strategies, bad input."""

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import nam_keras  # noqa: F401  (registers the custom objects)
import train
from nam_keras import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--synthetic-size", "64", "16", "--depth", "18", "--width", "4",
        "--batch-size", "8", "--precision", "float32", "--verbose", "2"]


def tiny_args(tmp_path, *extra, name="run"):
    return TINY + ["--run-dir", str(tmp_path / name), "--output", str(tmp_path / f"{name}.keras"),
                   *extra]


def run_train_subprocess(args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs,
    )


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ schedule


def test_warmup_cosine_values():
    f = lambda s: training.warmup_cosine(s, 0.1, 2000, 10001)  # noqa: E731
    assert f(0) == 0.0
    assert f(1000) == pytest.approx(0.05)
    assert f(2000) == pytest.approx(0.1)  # end of warmup = peak
    assert f(6000) == pytest.approx(0.05)  # half-way through the cosine
    assert f(2000 + 8000 // 4) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert f(10000) == pytest.approx(0.0, abs=1e-12)  # the last step
    assert f(20000) == pytest.approx(0.0, abs=1e-12)


def test_schedule_callback_uses_the_optimizer_iteration_count():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=training.TorchSGD(0.0), loss="mse")
    model.optimizer.build(model.trainable_variables)
    callback = training.WarmupCosine(0.1, total_steps=10001, warmup_steps=2000)
    callback.set_model(model)
    model.optimizer.iterations.assign(6000)  # as BackupAndRestore restores it
    callback.on_train_batch_begin(0)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs["lr"] == pytest.approx(0.05)
    clone = training.WarmupCosine.from_config(json.loads(json.dumps(callback.get_config())))
    assert clone.lr_at(2000) == pytest.approx(0.1)


def test_torch_sgd_matches_the_pytorch_update_by_hand():
    w0 = np.array([1.0, -2.0], "float32")
    var = keras.Variable(w0)
    opt = training.TorchSGD(learning_rate=0.1, momentum=0.9, l2=0.01)
    g1, g2 = np.array([0.5, 0.25], "float32"), np.array([-0.3, 0.1], "float32")
    opt.apply([g1], [var])
    buf = g1 + 0.01 * w0
    w1 = w0 - 0.1 * buf
    np.testing.assert_allclose(var.numpy(), w1, rtol=1e-6)
    opt.learning_rate = 0.05  # a changed LR applies to the whole buffer (PyTorch), not just g
    opt.apply([g2], [var])
    buf = 0.9 * buf + g2 + 0.01 * w1
    np.testing.assert_allclose(var.numpy(), w1 - 0.05 * buf, rtol=1e-6)
    config = opt.get_config()
    assert config["l2"] == 0.01 and config["momentum"] == 0.9
    with pytest.raises(ValueError, match="through `l2=`"):
        training.TorchSGD(weight_decay=5e-4)


# ------------------------------------------------------------------ end to end


def test_train_main_end_to_end(tmp_path):
    assert train.main(tiny_args(tmp_path, "--epochs", "2", "--steps-per-epoch", "2")) == 0
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


def test_baseline_and_mixup(tmp_path):
    args = tiny_args(tmp_path, "--baseline", "--epochs", "1", "--steps-per-epoch", "1", "--mixup",
                     "0.2", "--cutmix", "1.0", "--val-freq", "0")
    assert train.main(args) == 0
    model = keras.models.load_model(tmp_path / "run.keras")
    assert model.name == "resnet18_plain" and not nam_keras.nam_layers(model)


def test_kill_and_resume(tmp_path):
    """SIGKILL after the first epoch; the same command then runs only the rest."""
    args = tiny_args(tmp_path, "--epochs", "3", "--steps-per-epoch", "12", "--val-freq", "0")
    metadata = tmp_path / "run" / "backup" / "training_metadata.json"
    proc = run_train_subprocess(args)
    deadline = time.monotonic() + 120
    while not metadata.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    done = json.loads(metadata.read_text())["epoch"]
    assert 1 <= done < 3
    assert not (tmp_path / "run.keras").exists()

    proc = run_train_subprocess(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resuming from the backup in {tmp_path / 'run' / 'backup'}: {done} of 3 epochs done" in out
    ran = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert ran == [f"Epoch {e}/3" for e in range(done + 1, 4)]  # only the remaining epochs
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "log.csv")] == ["0", "1", "2"]
    model = keras.models.load_model(tmp_path / "run.keras")
    assert int(model.optimizer.iterations) == 36  # 3 epochs x 12 steps, as uninterrupted


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    proc = run_train_subprocess(tiny_args(tmp_path, "--epochs", "1", "--steps-per-epoch", "2",
                                          "--cpu-replicas", "2"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "strategy MirroredStrategy with 2 replica(s)" in out and "synchronised BN" in out
    assert "global batch 8 (4 per replica)" in out
    keras.models.load_model(tmp_path / "run.keras")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_multi_worker_mirrored_two_processes(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(run_train_subprocess(
            tiny_args(tmp_path, "--epochs", "1", "--steps-per-epoch", "3", "--val-freq", "0",
                      name=f"worker{i}"),
            env={"TF_CONFIG": tf_config},
        ))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "strategy MultiWorkerMirroredStrategy with 2 replica(s)" in out
    # trainable weights, optimizer state and (synchronised) BN statistics alike
    w0, w1 = (keras.models.load_model(tmp_path / f"worker{i}.keras").get_weights() for i in range(2))
    initial = nam_keras.build_resnet(depth=18, width=4)  # weights moved away from any init
    assert len(w0) == len(w1) == len(initial.get_weights())
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)


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
    ],
)
def test_bad_flags_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_output(tmp_path, capsys):
    args = tiny_args(tmp_path, "--epochs", "1")
    args[args.index("--output") + 1] = str(tmp_path / "missing" / "m.keras")
    assert train.main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    args[args.index("--output") + 1] = str(tmp_path)
    assert train.main(args) == 2
    assert "is a folder" in capsys.readouterr().err


def test_batch_not_divisible_by_replicas(tmp_path):
    proc = run_train_subprocess(tiny_args(tmp_path, "--epochs", "1", "--cpu-replicas", "2")
                                + ["--batch-size", "7"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "--batch-size 7 (the global batch) is not divisible by the 2 replicas" in out


def test_nan_loss_stops_and_keeps_last_good_backup(tmp_path, capsys):
    # step 0 runs at LR 0 (warmup), step 1 at 1e30: the weights blow up and
    # the loss of step 2 (epoch 3) is NaN.
    args = tiny_args(tmp_path, "--epochs", "4", "--steps-per-epoch", "1", "--lr", "1e30",
                     "--lr-scaling", "none", "--warmup-steps", "1", "--val-freq", "0")
    assert train.main(args) == 1
    err = capsys.readouterr().err
    assert "the training loss became nan" in err and "epoch 3" in err
    backup = tmp_path / "run" / "backup"
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    assert (backup / "latest.weights.h5").exists()
    assert not (tmp_path / "run.keras").exists()


def test_resume_refuses_a_different_run(tmp_path, capsys):
    args = tiny_args(tmp_path, "--epochs", "4", "--steps-per-epoch", "1", "--lr", "1e30",
                     "--lr-scaling", "none", "--warmup-steps", "1", "--val-freq", "0")
    assert train.main(args) == 1  # leaves a backup behind
    capsys.readouterr()
    assert train.main(args + ["--baseline"]) == 2
    assert "holds a backup of a different run" in capsys.readouterr().err


def test_train_and_evaluate_on_a_local_archive(tmp_path, capsys):
    """The real archive path end to end: --data-dir with a CIFAR-100 python archive."""
    import evaluate
    from test_data import make_cifar_archive

    archive, _ = make_cifar_archive(tmp_path / "cifar-100-python.tar.gz", n_train=32, n_test=20)
    args = [a for a in tiny_args(tmp_path, "--epochs", "1", "--steps-per-epoch", "2")]
    args[args.index("synthetic")] = "cifar100"
    with pytest.warns(UserWarning, match="subset"):
        assert train.main(args + ["--data-dir", str(archive)]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_examples"] == 32 and config["data_dir"] == str(archive)
    with pytest.warns(UserWarning, match="subset"):
        assert evaluate.main([str(tmp_path / "run.keras"), "--data-dir", str(archive),
                              "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["test"]["examples"] == 20


def test_batch_larger_than_the_training_split(tmp_path, capsys):
    args = tiny_args(tmp_path, "--epochs", "1")
    args[args.index("--synthetic-size") + 1] = "4"
    assert train.main(args) == 2
    assert "batch_size 8 is larger than the 4 training examples" in capsys.readouterr().err
