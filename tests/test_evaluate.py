"""evaluate.py end to end: the printed and JSON reports, the plot, bad input."""

import json

import keras
import pytest

import evaluate
import nam_keras
from nam_keras.cifar100 import CIFAR100_LABELS
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
    assert "the model has no NAM layers" in capsys.readouterr().out
    assert evaluation.nam_report(keras.models.load_model(path)) is None


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
