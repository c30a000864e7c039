"""`train.py --input device`: uint8 batches gathered on the host in the order of
`device_augment.batch_indices`, augmented inside the compiled train step; the
choice of input; training on it, and on JAX over two devices without TensorFlow."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import train
from nam_keras.data import device_augment
from nam_keras.data.device_input import DeviceAugmentation, TrainingBatches
from nam_keras.errors import ConfigError
from nam_keras.training import distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.fixture(scope="module")
def tiny_set():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), rng.integers(0, 5, 10)


def test_batches_follow_the_device_order_across_passes(tiny_set):
    batches = TrainingBatches(*tiny_set, batch_size=4, seed=3, start_step=1)
    seen = []
    for i in range(5):  # steps 1..5: positions 4..23, passes 0..2, two batches span passes
        images, labels, steps = batches[i]
        want = numpy(device_augment.batch_indices(1 + i, 3, 4, 10))
        np.testing.assert_array_equal(batches.indices(1 + i), want)
        np.testing.assert_array_equal(images, tiny_set[0][want])
        np.testing.assert_array_equal(labels, tiny_set[1][want])
        np.testing.assert_array_equal(steps, [1 + i] * 4)
        assert images.dtype == np.uint8 and steps.dtype == np.int32
        seen.extend(want)
    assert sorted(seen[6:16]) == list(range(10))  # positions 10..19: pass 1, a permutation
    assert batches.num_batches is None


def test_the_processes_of_a_host_each_get_their_rows_of_the_global_batch(tiny_set):
    settings = {"seed": 1, "one_hot": True, "num_classes": 5}
    batches = TrainingBatches(*tiny_set, batch_size=4, **settings)
    whole = batches[2]
    parts = [
        TrainingBatches(*tiny_set, 4, process_index=p, process_count=2, **settings)[2]
        for p in range(2)
    ]
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), whole[k])
    assert whole[1].shape == (4, 5) and whole[1].dtype == np.float32
    np.testing.assert_array_equal(whole[1].argmax(1), tiny_set[1][batches.indices(2)])
    np.testing.assert_array_equal(whole[1].sum(1), 1.0)
    with pytest.raises(ValueError, match="batch_size 4 is not divisible by the 3 processes"):
        TrainingBatches(*tiny_set, 4, process_count=3)
    with pytest.raises(ValueError, match=r"uint8 \(N, height, width, channels\); received float32"):
        TrainingBatches(tiny_set[0].astype("float32"), tiny_set[1], 4)


def test_device_augmentation_equals_the_gather_on_the_device(tiny_set):
    """Host gather + `DeviceAugmentation` = `device_augment.training_batch`, which
    gathers on the device: the same batch, augmented and mixed alike."""
    images, labels = tiny_set
    batches = TrainingBatches(images, labels, 4, seed=7, one_hot=True, num_classes=5)
    make = DeviceAugmentation(seed=7, augment="reference", mixup=0.4, cutmix=1.0)
    for step in (0, 2):
        got_x, got_y = make(batches[step])
        want_x, want_y = device_augment.training_batch(
            images, labels, step, 7, 4, mixup=0.4, cutmix=1.0, num_classes=5
        )
        np.testing.assert_allclose(numpy(got_x), numpy(want_x), atol=1e-4)
        np.testing.assert_allclose(numpy(got_y), numpy(want_y), atol=1e-6)
    assert not np.allclose(numpy(make(batches[0])[0]), numpy(make(batches[1])[0]))
    with pytest.raises(ValueError, match="augment must be one of"):
        DeviceAugmentation(augment="randaugment")


def test_auto_input_and_what_cannot_work(monkeypatch):
    monkeypatch.setattr(distribute, "backend", lambda: "tensorflow")
    monkeypatch.setattr(distribute, "tensorflow_installed", lambda: True)
    assert distribute.resolve_input("auto") == ("host", "")
    assert distribute.resolve_input("device") == ("device", "")
    with pytest.raises(ConfigError, match="--randaugment has no device-side form"):
        distribute.resolve_input("device", randaugment=True)
    with pytest.raises(ConfigError, match="would draw the same augmentation for each replica"):
        distribute.resolve_input("device", replicas=2)
    with pytest.raises(ConfigError, match="no kernel for the Beta draws of --mixup/--cutmix"):
        distribute.resolve_input("device", xla_mixing=True)
    monkeypatch.setattr(distribute, "backend", lambda: "jax")  # one step for all devices
    assert distribute.resolve_input("device", replicas=2, xla_mixing=True) == ("device", "")
    assert distribute.resolve_input("host", randaugment=True, replicas=2) == ("host", "")
    monkeypatch.setattr(distribute, "tensorflow_installed", lambda: False)
    assert distribute.resolve_input("auto") == ("device", " (TensorFlow is not installed)")
    with pytest.raises(ConfigError, match=r"--input host makes batches with tf\.data"):
        distribute.resolve_input("host")
    with pytest.raises(ConfigError, match=r"made on the device \(TensorFlow is not installed\)"):
        distribute.resolve_input("auto", randaugment=True)


@pytest.mark.slow
def test_train_on_device_input_records_it_and_keeps_it_on_resume(tmp_path, tiny_args, capsys):
    args = tiny_args("--epochs", "1", "--steps-per-epoch", "2", "--input", "device")
    assert train.main([*args, "--mixup", "0.2", "--label-smoothing", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "trains on 1 device;" in out and "input: augmented on the device" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["input"] == "device"
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert np.isfinite(float(row["loss"])) and np.isfinite(float(row["val_loss"]))
    extend = tiny_args("--epochs", "2", "--steps-per-epoch", "2", "--extend", "--input", "host")
    assert train.main([*extend, "--mixup", "0.2", "--label-smoothing", "0.1"]) == 2
    assert "{'input': ('device', 'host')}" in capsys.readouterr().err


def _jax_train(tmp_path, hide_tensorflow, args, interrupt_at=None, cache=True):
    """train.py under JAX, TensorFlow hidden by the code `hide_tensorflow`;
    SIGTERM once `interrupt_at` exists. `cache`: JAX's persistent compilation
    cache (conftest's) is used (half the time of a run); etils, which JAX's cache
    uses, asks find_spec("tensorflow"), which the hook makes raise:
    EPATH_USE_TF=false keeps it from asking. Two devices run without it: an
    executable read back from it loses the order of its collectives (some sit
    in the while loops of the Beta draws), and the two CPU devices then
    deadlock now and then (XLA's 40 s rendezvous timeout, exit -6: 4 of 52 runs
    here, none of 32 compiled afresh)."""
    script = tmp_path / "no_tf_train.py"
    train_py = os.path.join(ROOT, "train.py")
    script.write_text(
        hide_tensorflow
        + f"import runpy\nsys.argv = [{train_py!r}, *sys.argv[1:]]\n"
        + f"runpy.run_path({train_py!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    env["EPATH_USE_TF" if cache else "JAX_ENABLE_COMPILATION_CACHE"] = "false"
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if interrupt_at is not None:
        deadline = time.monotonic() + 300
        while not interrupt_at.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def _column(run_dir, name):
    with open(run_dir / "log.csv", newline="") as f:
        return [float(row[name]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_jax_without_tensorflow_two_devices_equal_one_and_resume(
    tmp_path, tiny_args, no_tensorflow
):
    """On JAX with TensorFlow missing, `--input auto` makes the batches on the
    device; over two (virtual CPU) devices with keras.distribution the run equals
    the one-device run on the same global batch (training and validation losses,
    weights and BN statistics: per-device BN statistics would differ), also when
    it was interrupted after its first epoch and resumed."""
    common = ["--epochs", "2", "--steps-per-epoch", "2", "--val-steps", "1", "--mixup", "0.2"]
    code, out = _jax_train(tmp_path, no_tensorflow, tiny_args(*common, name="one"))
    assert code == 0, out
    assert "trains on 1 device;" in out
    assert "input: augmented on the device (TensorFlow is not installed)" in out

    two = tiny_args(*common, "--cpu-replicas", "2", name="two")
    backup = tmp_path / "two" / "backup" / "epoch-00001.weights.h5"
    code, out = _jax_train(tmp_path, no_tensorflow, two, interrupt_at=backup, cache=False)
    assert code == 128 + signal.SIGTERM, out
    assert "trains on 2 devices with keras.distribution.DataParallel" in out
    code, out = _jax_train(tmp_path, no_tensorflow, two, cache=False)
    assert code == 0 and "resuming from the backup" in out, out

    for column in ("loss", "val_loss"):
        np.testing.assert_allclose(
            _column(tmp_path / "two", column), _column(tmp_path / "one", column), rtol=1e-5
        )
    one = keras.models.load_model(tmp_path / "one.keras")
    two = keras.models.load_model(tmp_path / "two.keras")
    assert [w.path for w in one.weights] == [w.path for w in two.weights]  # the same layout
    for a, b in zip(one.weights, two.weights):
        np.testing.assert_allclose(numpy(b), numpy(a), rtol=1e-4, atol=1e-6, err_msg=a.path)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert (config["replicas"], config["input"], config["strategy"]) == (
        2,
        "device",
        "keras.distribution.DataParallel",
    )
    # a last validation batch that does not split over the devices: refused before training
    odd = tiny_args("--synthetic-size", "64", "13", "--cpu-replicas", "2", name="odd")
    code, out = _jax_train(tmp_path, no_tensorflow, odd)
    assert code == 2, out
    assert "end with a batch of 5, which does not split over the 2 devices" in out
    assert "--val-steps 1 (the full batches)" in out
