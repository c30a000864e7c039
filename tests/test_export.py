"""The TF Serving SavedModel: signature, predictions equal to Keras, versions."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import evaluate
import nam_keras
from nam_keras.config import EvalConfig
from nam_keras.errors import ConfigError
from nam_keras.reports import evaluation
from nam_keras.serving import export

SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("export") / "nam"
    assert evaluate.main([str(trained_model), "--skip-eval", "--export", str(export_dir)]) == 0
    return export_dir


def _images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _keras_probabilities(path, images):
    model = keras.models.load_model(path)
    return keras.ops.convert_to_numpy(
        keras.ops.softmax(model(images.astype("float32"), training=False))
    )


def test_saved_model_cli_shows_the_signature(exported):
    out = subprocess.run(
        [SAVED_MODEL_CLI, "show", "--dir", str(exported / "1"), "--all"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    sig = out[out.index("signature_def['serving_default']") :]
    assert (
        "inputs['images'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 32, 32, 3)"
        in sig
    )
    assert (
        "outputs['probabilities'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 100)"
        in sig
    )
    assert (
        "outputs['top5_classes'] tensor_info:\n        dtype: DT_INT32\n        shape: (-1, 5)"
        in sig
    )


def test_saved_model_predictions_equal_keras(trained_model, exported, tmp_path):
    images = _images()
    want = _keras_probabilities(trained_model, images)
    np.save(tmp_path / "images.npy", images)
    subprocess.run(
        [
            SAVED_MODEL_CLI,
            "run",
            "--dir",
            str(exported / "1"),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"images={tmp_path / 'images.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ],
        check=True,
        capture_output=True,
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "probabilities.npy"), want, rtol=1e-4, atol=1e-6
    )
    top5 = np.load(tmp_path / "out" / "top5_classes.npy")
    np.testing.assert_array_equal(top5, np.argsort(-want, axis=1)[:, :5])

    loaded = tf.saved_model.load(str(exported / "1"))
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(out["probabilities"].numpy(), want, rtol=1e-4, atol=1e-6)
    assert out["top5_classes"].dtype == tf.int32


def test_wrong_images_are_rejected_by_the_signature(exported):
    serve = tf.saved_model.load(str(exported / "1")).signatures["serving_default"]
    errors = (TypeError, ValueError, tf.errors.InvalidArgumentError)
    with pytest.raises(errors, match="expected to be a uint8 tensor but is a float tensor"):
        serve(images=tf.constant(_images().astype("float32")))
    with pytest.raises(
        errors,
        match=r"Shape of tensor .* \[2,28,28,3\] is not compatible with expected shape "
        r"\[\?,32,32,3\]",
    ):
        serve(images=tf.zeros((2, 28, 28, 3), tf.uint8))


def test_second_export_creates_version_2(trained_model, exported):
    assert export.next_version(exported) == 2
    path = export.export_saved_model(keras.models.load_model(trained_model), exported)
    assert path == os.path.join(str(exported), "2")
    assert sorted(os.listdir(exported)) == ["1", "2"]  # no temporary folder left behind


def test_the_version_folder_is_readable_by_other_users(exported):
    assert (exported / "1").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_empty_and_oversized_batches_are_refused_with_a_message(exported):
    serve = tf.saved_model.load(str(exported / "1")).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one image"):
        serve(images=tf.zeros((0, 32, 32, 3), tf.uint8))
    too_many = export.MAX_SERVING_BATCH + 1
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"at most {too_many - 1} images"):
        serve(images=tf.zeros((too_many, 32, 32, 3), tf.uint8))


def _litert_probabilities(path, images):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    source, result = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert source["dtype"] == np.uint8 and tuple(source["shape_signature"]) == (-1, 32, 32, 3)
    interpreter.resize_tensor_input(source["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(result["index"])


#: --tflite-quantize -> largest difference from Keras' probabilities we accept
LITERT_TOLERANCE = {"none": 1e-5, "float16": 1e-3, "dynamic": 5e-3}


def _onnx_probabilities(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (source,) = session.get_inputs()
    assert (source.name, source.type, source.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    return session.run(["probabilities"], {"images": images})[0]


def test_evaluate_reads_what_it_exports_with_the_same_figures(
    trained_model, exported, tmp_path, capsys
):
    """The .keras file, its SavedModel, LiteRT (plain and int8) and ONNX exports:
    the same probabilities, and evaluate.py reports the same figures for each."""
    artefacts = {"keras": trained_model, "saved_model": exported / "1"}
    artefacts["tflite"] = tmp_path / "m.tflite"
    int8 = tmp_path / "m-int8.tflite"
    for path, quantize in ((artefacts["tflite"], "none"), (int8, "dynamic")):
        argv = [str(trained_model), "--skip-eval", "--export-tflite", str(path)]
        assert evaluate.main([*argv, "--tflite-quantize", quantize]) == 0
        printed = capsys.readouterr().out
        assert "LiteRT model ->" in printed and "NAM report" not in printed  # the export only
    model = keras.models.load_model(trained_model)
    artefacts["onnx"] = export.export_onnx(model, str(tmp_path / "m.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["m-int8.tflite", "m.onnx", "m.tflite"]  # no tmp file
    assert int8.stat().st_size < artefacts["tflite"].stat().st_size / 2  # int8 weights
    images = _images(6)
    want = _keras_probabilities(trained_model, images)
    np.testing.assert_allclose(_litert_probabilities(artefacts["tflite"], images), want, atol=1e-5)
    got = _litert_probabilities(int8, images)
    np.testing.assert_allclose(got, want, atol=LITERT_TOLERANCE["dynamic"])
    np.testing.assert_allclose(_onnx_probabilities(artefacts["onnx"], images), want, atol=1e-5)
    data = {"dataset": "synthetic", "synthetic_size": (8, 40), "batch_size": 16}
    reports = {
        kind: evaluation.evaluate(EvalConfig(model=str(path), **data)).report
        for kind, path in artefacts.items()
    }
    assert [r["format"] for r in reports.values()] == list(artefacts)
    first = reports["keras"]["test"]
    assert sum(map(sum, first["confusion_matrix"])) == 40
    for kind, report in reports.items():
        test = report["test"]
        assert test["loss"] == pytest.approx(first["loss"], rel=1e-5), kind
        assert (test["top1"], test["top5"]) == (first["top1"], first["top5"]), kind
        assert test["confusion_matrix"] == first["confusion_matrix"], kind
    assert reports["saved_model"]["nam"] is None and len(reports["keras"]["nam"]["layers"]) == 8


def test_evaluate_names_what_it_cannot_read_or_export(exported, tmp_path, capsys):
    assert evaluate.main([str(exported), "--skip-eval"]) == 2
    err = capsys.readouterr().err
    assert f"{exported}: a folder of SavedModel versions [1" in err
    assert f"name one, e.g. {exported / str(export.next_version(exported) - 1)}" in err
    argv = [str(exported / "1"), "--skip-eval", "--export-tflite", str(tmp_path / "m.tflite")]
    assert evaluate.main(argv) == 2
    assert (
        "--export-tflite: exports are made from a .keras file; "
        f"{exported / '1'} is a SavedModel folder." in capsys.readouterr().err
    )
    (tmp_path / "m.onnx").write_text("not onnx")
    assert evaluate.main([str(tmp_path / "m.onnx"), "--skip-eval"]) == 2
    assert "m.onnx: cannot be loaded as an ONNX model" in capsys.readouterr().err


def test_onnx_export_without_its_packages_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import tf2onnx raises ImportError
    with pytest.raises(ConfigError, match=r"--export-onnx needs tf2onnx and onnx .*pip install"):
        export.export_onnx(None, str(tmp_path / "m.onnx"))  # refused before the model is used
    assert os.listdir(tmp_path) == []


def test_a_mixed_precision_model_exports_in_float32_with_float16_weights(tmp_path):
    model = nam_keras.build_resnet(depth=18, width=4, dtype="mixed_bfloat16")
    copy = export.float32_copy(model)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    assert export.float32_copy(copy) is copy
    images = _images(3)
    want = keras.ops.convert_to_numpy(keras.ops.softmax(copy(images.astype("float32"))))
    path = export.export_tflite(model, tmp_path / "bf16.tflite", "float16")
    got = _litert_probabilities(path, images)
    np.testing.assert_allclose(got, want, atol=LITERT_TOLERANCE["float16"])


def test_a_litert_path_must_end_in_tflite(capsys):
    with pytest.raises(SystemExit) as info:
        evaluate.main(["m.keras", "--export-tflite", "m.lite"])
    assert info.value.code == 2
    assert "--export-tflite must name a .tflite file; received 'm.lite'" in capsys.readouterr().err
