"""The training run as a library: `train(TrainConfig)` and its steps."""

import json

import keras
import pytest

from nam_keras import experiment
from nam_keras.config import TrainConfig


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
def test_train_returns_the_model_logs_and_summary(tmp_path):
    result = experiment.train(tiny_config(tmp_path))
    assert isinstance(result.model, keras.Model) and result.model.name == "resnet18_nam"
    assert int(result.model.optimizer.iterations) == 2
    assert set(result.logs) >= {"loss", "top1", "top5", "lr"}
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved == result.summary and saved["output"] == str(tmp_path / "m.keras")
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["total_steps"] == 2 and resolved["precision"] == "float32"
