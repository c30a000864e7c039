"""The training run as a library: `train(TrainConfig)` and its steps."""

import json

import keras
import pytest

from nam_keras import experiment
from nam_keras.config import TrainConfig
from nam_keras.errors import ConfigError


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


def test_check_resumable_names_what_changed(tmp_path):
    paths = experiment.RunPaths(run_dir=str(tmp_path), output=str(tmp_path / "m.keras"))
    saved = {
        "model": "nam",
        "depth": 18,
        "width": 4,
        "stem": "cifar",
        "spatial": False,
        "sparsity": 1e-4,
        "stop_gradient": False,
        "precision": "float32",
        "num_classes": 100,
        "mixing": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(saved))
    experiment.check_resumable(paths, dict(saved))  # the same run: accepted
    with pytest.raises(ConfigError, match=r"'depth': \(18, 50\)"):
        experiment.check_resumable(paths, {**saved, "depth": 50})


def test_truncate_csv_keeps_the_epochs_the_backup_holds(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")
    experiment.truncate_csv(path, 2)
    assert path.read_text() == "epoch,loss\n0,1.0\n1,0.9\n"


def test_read_backup_epoch_falls_back_to_the_bkp_copy(tmp_path):
    assert experiment.read_backup_epoch(tmp_path) is None
    (tmp_path / "training_metadata.json").write_text("{broken")
    (tmp_path / "training_metadata.json.bkp").write_text('{"epoch": 3, "batch": 0}')
    assert experiment.read_backup_epoch(tmp_path) == 3
