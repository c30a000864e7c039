"""evaluate.py end to end and `evaluation.evaluate` from Python: the printed
and JSON reports, the numbers against NumPy, the plot, bad input."""

import json

import keras
import numpy as np
import pytest

import evaluate
import nam_keras
from nam_keras.cifar100 import CIFAR100_LABELS
from nam_keras.config import EvalConfig
from nam_keras.data import sources
from nam_keras.errors import ConfigError
from nam_keras.reports import evaluation


@pytest.mark.slow
def test_evaluate_main_writes_every_field(trained_model, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = [str(trained_model), "--dataset", "synthetic", "--synthetic-size", "16", "600"]
    argv += ["--json", str(out), "--plots", str(tmp_path / "plots")]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "NAM report: 8 NAM layers" in printed
    report = json.loads(out.read_text())
    test = report["test"]
    assert {"examples", "loss", "top1", "top5", "per_class_accuracy", "worst_classes"} <= set(test)
    assert test["examples"] == 600 and 0 <= test["top1"] <= test["top5"] <= 1
    assert (
        set(test["per_class_accuracy"]) <= set(CIFAR100_LABELS)
        and len(test["per_class_accuracy"]) > 90
    )
    assert len(test["worst_classes"]) == 10
    assert len(test["per_superclass"]) == 20 and 0 <= test["near_miss"] <= 1 - test["top1"]
    assert (
        test["top1"] <= test["superclass_top1"] == pytest.approx(test["top1"] + test["near_miss"])
    )
    assert "superclasses: top-1" in printed and "vehicles_2" in printed
    assert len(report["nam"]["layers"]) == 8
    png = tmp_path / "plots" / "nam_weights.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_model_has_no_nam_report(tmp_path, capsys):
    path = tmp_path / "baseline.keras"
    nam_keras.build_resnet(depth=18, width=4, attention=None).save(path)
    assert evaluate.main([str(path), "--skip-eval", "--plots", str(tmp_path / "p")]) == 0
    assert "[nam-keras] NAM report: the model has no NAM layers" in capsys.readouterr().out
    assert evaluation.nam_report(keras.models.load_model(path)) is None


# ------------------------------------------------------------------ from Python


def _numpy_top1_and_loss(model, config):
    """Top-1 and cross-entropy of `model` on the config's test split, in NumPy."""
    images, labels = sources.load_for(config)["test"]
    logits = keras.ops.convert_to_numpy(model(images.astype("float32"), training=False))
    logits = logits.astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    loss = (log_z - logits[np.arange(len(labels)), labels]).mean()
    return (logits.argmax(1) == labels).mean(), loss


def test_evaluate_returns_the_report_and_the_paths(tmp_path):
    path = tmp_path / "nam.keras"
    nam_keras.build_resnet(depth=18, width=4).save(path)
    config = EvalConfig(
        model=str(path),
        dataset="synthetic",
        synthetic_size=(8, 24),
        batch_size=10,  # a last partial batch
        json=str(tmp_path / "r.json"),
        plots=str(tmp_path / "plots"),
    )
    result = evaluation.evaluate(config)
    assert isinstance(result, evaluation.EvalResult) and isinstance(result.model, keras.Model)
    top1, loss = _numpy_top1_and_loss(result.model, config)
    test = result.report["test"]
    assert test["examples"] == 24
    assert test["top1"] == pytest.approx(top1) and test["loss"] == pytest.approx(loss, rel=1e-5)
    assert result.report["nam"] == evaluation.nam_report(result.model, config.near_zero)
    assert result.paths == {
        "plot": str(tmp_path / "plots" / "nam_weights.png"),
        "confusion_plot": str(tmp_path / "plots" / "superclass_confusion.png"),
        "json": config.json,
    }
    for key in ("plot", "confusion_plot"):
        with open(result.paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "r.json").read_text()) == result.report
    predicted = np.asarray(test["confusion_matrix"]).sum(axis=0)  # images per predicted class
    by_superclass = np.asarray(test["superclass_confusion_matrix"])
    assert by_superclass.shape == (20, 20) and by_superclass.sum() == predicted.sum() == 24


def _memorising_model(config, known):
    """A linear model whose logits are 10 at the true class of the first
    `known` test images and at a wrong class of the others."""
    images, labels = sources.load_for(config)["test"]
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    targets = np.where(np.arange(len(labels)) < known, labels, (labels + 1) % 100)
    kernel = np.linalg.pinv(x) @ (10.0 * np.eye(100)[targets])  # exact: 3072 > n unknowns
    inputs = keras.Input((32, 32, 3))
    dense = keras.layers.Dense(100, use_bias=False)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs / 255.0)))
    dense.kernel.assign(kernel.astype("float32"))
    return model


def test_evaluate_top1_of_a_model_that_knows_some_labels(tmp_path):
    config = EvalConfig(
        model=str(tmp_path / "m.keras"), dataset="synthetic", synthetic_size=(8, 20)
    )
    _memorising_model(config, known=7).save(config.model)
    result = evaluation.evaluate(config)
    assert result.report["test"]["top1"] == pytest.approx(7 / 20)
    top1, loss = _numpy_top1_and_loss(result.model, config)
    assert top1 == pytest.approx(7 / 20)
    assert result.report["test"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert result.report["nam"] is None and result.paths == {}


def test_evaluate_checks_the_outputs_before_loading(tmp_path):
    missing = tmp_path / "absent.keras"  # would be a ModelError, after the checks
    with pytest.raises(ConfigError, match="does not exist"):
        evaluation.evaluate(EvalConfig(model=str(missing), json=str(tmp_path / "no" / "r.json")))
    with pytest.raises(ConfigError, match="name the model"):
        evaluation.evaluate(EvalConfig(dataset="synthetic"))


# ------------------------------------------------------------------ bad input


def test_not_a_keras_model(tmp_path, capsys):
    bogus = tmp_path / "model.keras"
    bogus.write_text("hello")
    assert evaluate.main([str(bogus), "--skip-eval"]) == 2
    assert f"{bogus}: not a Keras model" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path / "absent.keras"), "--skip-eval"]) == 2
    assert "no such model file" in capsys.readouterr().err


def test_model_with_wrong_input_shape(tmp_path, capsys):
    path = tmp_path / "small.keras"
    nam_keras.build_resnet(depth=18, width=4, input_shape=(16, 16, 3)).save(path)
    assert evaluate.main([str(path), "--skip-eval"]) == 2
    assert "expected (None, 32, 32, 3)" in capsys.readouterr().err


def test_export_folder_that_is_a_file(trained_model, tmp_path, capsys):
    target = tmp_path / "export"
    target.write_text("")
    assert evaluate.main([str(trained_model), "--skip-eval", "--export", str(target)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err


def test_bad_flags_exit_2_with_message(trained_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(trained_model), "--near-zero", "2"])
    assert exit_info.value.code == 2
    assert "--near-zero must be in (0, 1]; received 2.0" in capsys.readouterr().err


@pytest.mark.parametrize("num_classes", [10])
def test_a_model_that_is_not_a_cifar100_classifier(tmp_path, capsys, num_classes):
    path = tmp_path / "ten.keras"
    nam_keras.build_resnet(depth=18, width=4, num_classes=num_classes).save(path)
    assert evaluate.main([str(path), "--skip-eval"]) == 2
    assert "output has shape (None, 10); expected (None, 100)" in capsys.readouterr().err


def test_report_paths_are_checked_before_the_evaluation(trained_model, tmp_path, capsys):
    missing = tmp_path / "missing" / "r.json"
    argv = [str(trained_model), "--dataset", "synthetic", "--json", str(missing)]
    assert evaluate.main(argv) == 2
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and "top-1" not in captured.out


def test_export_paths_are_checked_before_loading(tmp_path, capsys):
    """--export FILE/sub failed with NotADirectoryError after the whole evaluation;
    --export FILE was refused only after it. A missing model would be a ModelError:
    the export path is refused before it is loaded."""
    missing = str(tmp_path / "absent.keras")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert evaluate.main([missing, "--export", str(a_file / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"cannot create folder '{a_file / 'sub'}': '{a_file}' is not a folder" in err
    assert evaluate.main([missing, "--export", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "--export: " in err and "is a file; expected a folder" in err
    assert evaluate.main([missing, "--export", str(tmp_path / ("x" * 300) / "v")]) == 2
    assert "is longer than the 255 bytes" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing created


@pytest.mark.parametrize(
    "option, path, named, not_named",
    [
        ("export", "out", "--export: the TF Serving export needs", "LiteRT"),
        ("export_tflite", "m.tflite", "--export-tflite: the LiteRT (TFLite) export", "TF Serving"),
    ],
)
def test_the_backend_check_names_the_export_refused(
    monkeypatch, tmp_path, option, path, named, not_named
):
    """On JAX, refusing --export-tflite spoke of "the TF Serving export"."""
    from nam_keras.serving import export

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    config = EvalConfig(model=str(tmp_path / "m.keras"), **{option: str(tmp_path / path)})
    with pytest.raises(ConfigError) as info:
        evaluation.check_outputs(config)
    message = str(info.value)
    assert named in message and not_named not in message and "KERAS_BACKEND is 'jax'" in message
    flag = "--" + option.replace("_", "-")
    assert f"KERAS_BACKEND=tensorflow python evaluate.py MODEL {flag} " in message
    with pytest.raises(ConfigError, match="--export-tflite: the LiteRT"):
        export.check_backend("--export-tflite")
