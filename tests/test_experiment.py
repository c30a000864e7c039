"""The training run as a library: `train(TrainConfig)` and its steps."""

import json

import keras
import numpy as np
import pytest

from nam_keras.config import TrainConfig
from nam_keras.training import callbacks, experiment


def tiny_config(tmp_path, **overrides):
    settings = {
        "dataset": "synthetic",
        "synthetic_size": (32, 8),
        "depth": 18,
        "width": 4,
        "batch_size": 8,
        "epochs": 1,
        "steps_per_epoch": 2,
        "val_freq": 0,
        "precision": "float32",
        "verbose": 0,
        "run_dir": str(tmp_path / "run"),
        "output": str(tmp_path / "m.keras"),
    }
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.slow
def test_train_returns_the_model_logs_and_summary_and_uses_the_ema_weights(tmp_path):
    """`train` returns the model, the last epoch's logs and the summary it wrote; with
    `ema`, it saves and validates with the EMA weights. (One run for both: each run
    costs seconds of tracing.)"""
    result = experiment.train(tiny_config(tmp_path, ema=0.5, epochs=2, val_freq=1))
    model = result.model
    assert isinstance(model, keras.Model) and model.name == "resnet18_nam"
    assert int(model.optimizer.iterations) == 4  # 2 epochs x 2 steps
    assert set(result.logs) >= {"loss", "top1", "top5", "lr", "val_top1"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == result.summary and summary["output"] == str(tmp_path / "m.keras")
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["total_steps"] == 4 and resolved["precision"] == "float32"
    # finalize_variable_values swapped the EMA in: every trainable variable equals
    # its average, found among the optimizer's public variables by name
    by_name = {v.name: v for v in model.optimizer.variables}
    for var in model.trainable_variables:
        average = by_name[var.path.replace("/", "_") + "_average"]
        np.testing.assert_array_equal(np.asarray(var), np.asarray(average))
    saved = keras.models.load_model(tmp_path / "m.keras")
    for a, b in zip(saved.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_label_smoothing_loss_by_hand(tmp_path):
    config = tiny_config(tmp_path, label_smoothing=0.1)
    model = experiment.build_and_compile(config, experiment.set_up_devices(config))
    logits = np.array([[2.0, 0.0, -1.0] + [0.0] * 97, [0.5] * 100], "float32")
    soft = np.zeros((2, 100), "float32")  # a MixUp-style soft label and a hard one
    soft[0, 0], soft[0, 1], soft[1, 7] = 0.7, 0.3, 1.0
    smoothed = soft * 0.9 + 0.1 / 100
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    want = -(smoothed * log_p).sum(axis=1).mean()
    assert float(model.loss(soft, logits)) == pytest.approx(want, rel=1e-5)
    assert config.one_hot and not config.mixing


def test_each_epoch_is_logged_before_its_backup(tmp_path):
    """A kill between the two must leave a log row the resume trims, never a
    backup whose epoch has no row: the loggers come before the backup."""
    from nam_keras.training.run_directory import CSVLog, EpochBackup, RunDirectory

    config = tiny_config(tmp_path)
    devices = experiment.set_up_devices(config)
    run = RunDirectory(config.resolved_run_dir, config.resolved_output)
    kinds = [type(c) for c in experiment.make_callbacks(config, devices, run, 2)]
    assert kinds.index(CSVLog) < kinds.index(callbacks.TensorBoard) < kinds.index(EpochBackup)
    assert kinds[-1] is EpochBackup


def test_loss_is_the_cross_entropy_and_the_penalty_is_trained_and_logged_apart(tmp_path):
    """`loss`/`val_loss` are what evaluate.py reports; NAM's penalty is logged as
    `sparsity_penalty` and still in the gradient."""
    import tensorflow as tf

    from nam_keras import NAMAttention, batch_normalization
    from nam_keras.reports.evaluation import accuracy_report
    from nam_keras.training.trainer import CrossEntropyModel

    config = tiny_config(tmp_path)
    built = experiment.build_and_compile(config, experiment.set_up_devices(config))
    assert isinstance(built, CrossEntropyModel)
    inputs = keras.Input((8, 8, 3))
    nam = NAMAttention(sparsity=0.01)
    x = nam(batch_normalization("bn")(keras.layers.Conv2D(4, 3)(inputs)))
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    model = CrossEntropyModel.wrap(keras.Model(inputs, outputs))
    model.compile(optimizer="sgd", loss=built.loss)
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    y = np.arange(16) % 10
    logs = model.fit(x, y, batch_size=8, verbose=0, validation_data=(x, y)).history
    penalty = 0.01 * float(np.abs(nam.channel_bn.gamma.numpy()).sum())
    assert logs["val_sparsity_penalty"][0] == pytest.approx(penalty, rel=1e-6)
    report = accuracy_report(model.predict(x, verbose=0), y)
    assert logs["val_loss"][0] == pytest.approx(report["loss"], rel=1e-6)
    gamma = nam.channel_bn.gamma
    values, grads = [], []
    for loss in (model.compute_loss, lambda x, y, p: model.loss(y, p)):  # with and without
        with tf.GradientTape() as tape:
            value = loss(x, y, model(x, training=True))
        values.append(float(value))
        grads.append(tape.gradient(value, gamma).numpy())
    assert values[0] == values[1]  # the value: the cross-entropy alone
    penalty_gradient = 0.01 * np.sign(gamma.numpy())  # d/d gamma of 0.01 * sum |gamma|
    np.testing.assert_allclose(grads[0] - grads[1], penalty_gradient, rtol=1e-5)
