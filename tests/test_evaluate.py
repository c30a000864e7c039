"""evaluate.py: the report, the NAM analysis, the SavedModel export and the REST client."""

import http.server
import json
import os
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import evaluate
import nam_keras
import train
from nam_keras import client, evaluation
from nam_keras.data import CIFAR100_LABELS

SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny NAM ResNet written by a real (short) train.py run."""
    root = tmp_path_factory.mktemp("trained")
    args = ["--dataset", "synthetic", "--synthetic-size", "64", "16", "--depth", "18", "--width", "4",
            "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "2", "--val-freq", "0",
            "--precision", "float32", "--verbose", "0",
            "--run-dir", str(root / "run"), "--output", str(root / "nam.keras")]
    assert train.main(args) == 0
    keras.mixed_precision.set_global_policy("float32")
    return root / "nam.keras"


def test_accuracy_report_by_hand():
    logits = np.array([[5, 4, 3, 2, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6], [1, 0, 0, 0, 0, 0, 0]], float)
    logits = np.pad(logits, ((0, 0), (0, 93)), constant_values=-10)
    labels = np.array([0, 1, 99])
    r = evaluation.accuracy_report(logits, labels)
    assert r["top1"] == pytest.approx(1 / 3)  # only the first
    assert r["top5"] == pytest.approx(1 / 3)  # label 1 is 6th of row 2; 99 is last of row 3
    p0 = np.exp(logits[0]) / np.exp(logits[0]).sum()
    p1 = np.exp(logits[1]) / np.exp(logits[1]).sum()
    p2 = np.exp(logits[2]) / np.exp(logits[2]).sum()
    assert r["loss"] == pytest.approx(-(np.log(p0[0]) + np.log(p1[1]) + np.log(p2[99])) / 3)
    assert r["per_class_accuracy"] == {"apple": 1.0, "aquarium_fish": 0.0, "worm": 0.0}
    assert [w["class"] for w in r["worst_classes"]] == ["aquarium_fish", "worm", "apple"]


def test_evaluate_main_writes_every_field(trained, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = [str(trained), "--dataset", "synthetic", "--synthetic-size", "16", "600", "--json", str(out),
            "--plots", str(tmp_path / "plots")]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "NAM report: 8 NAM layers" in printed
    report = json.loads(out.read_text())
    test = report["test"]
    assert {"examples", "loss", "top1", "top5", "per_class_accuracy", "worst_classes"} <= set(test)
    assert test["examples"] == 600 and 0 <= test["top1"] <= test["top5"] <= 1
    assert set(test["per_class_accuracy"]) <= set(CIFAR100_LABELS) and len(test["per_class_accuracy"]) > 90
    assert len(test["worst_classes"]) == 10
    assert len(report["nam"]["layers"]) == 8
    png = tmp_path / "plots" / "nam_weights.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nam_report_weights_are_gamma_over_sum(rng):
    model = nam_keras.build_resnet(depth=18, width=8)
    for layer in nam_keras.nam_layers(model):
        n = layer.channel_bn.gamma.shape[0]
        layer.channel_bn.gamma.assign(rng.normal(size=n).astype("float32"))
    report = evaluation.nam_report(model, near_zero=0.5)
    below = total = 0
    for layer, entry in zip(nam_keras.nam_layers(model), report["layers"]):
        g = np.abs(layer.channel_bn.gamma.numpy().astype(np.float64))
        np.testing.assert_allclose(entry["channel"]["weights"], g / g.sum(), rtol=1e-6)
        expected = int((g / g.sum() < 0.5 / g.size).sum())
        assert entry["channel"]["near_zero"] == expected
        below, total = below + expected, total + g.size
    assert report["near_zero_fraction"] == pytest.approx(below / total)
    assert 0 < below < total


def test_baseline_model_has_no_nam_report(tmp_path, capsys):
    path = tmp_path / "baseline.keras"
    nam_keras.build_resnet(depth=18, width=4, attention=None).save(path)
    assert evaluate.main([str(path), "--skip-eval", "--plots", str(tmp_path / "p")]) == 0
    assert "the model has no NAM layers" in capsys.readouterr().out
    assert evaluation.nam_report(keras.models.load_model(path)) is None


# ------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("export") / "nam"
    assert evaluate.main([str(trained), "--skip-eval", "--export", str(export_dir)]) == 0
    return export_dir


def _images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _keras_probabilities(path, images):
    model = keras.models.load_model(path)
    return keras.ops.convert_to_numpy(keras.ops.softmax(model(images.astype("float32"), training=False)))


def test_saved_model_cli_shows_the_signature(exported):
    out = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", str(exported / "1"), "--all"],
                         check=True, capture_output=True, text=True).stdout
    sig = out[out.index("signature_def['serving_default']"):]
    assert "inputs['images'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 32, 32, 3)" in sig
    assert "outputs['probabilities'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 100)" in sig
    assert "outputs['top5_classes'] tensor_info:\n        dtype: DT_INT32\n        shape: (-1, 5)" in sig


def test_saved_model_predictions_equal_keras(trained, exported, tmp_path):
    images = _images()
    want = _keras_probabilities(trained, images)
    np.save(tmp_path / "images.npy", images)
    subprocess.run([SAVED_MODEL_CLI, "run", "--dir", str(exported / "1"), "--tag_set", "serve",
                    "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'images.npy'}",
                    "--outdir", str(tmp_path / "out")], check=True, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probabilities.npy"), want, rtol=1e-4, atol=1e-6)
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
    with pytest.raises(errors, match=r"Shape of tensor .* \[2,28,28,3\] is not compatible with expected shape \[\?,32,32,3\]"):
        serve(images=tf.zeros((2, 28, 28, 3), tf.uint8))


def test_second_export_creates_version_2(trained, exported):
    assert evaluation.next_version(exported) == 2
    path = evaluation.export_saved_model(keras.models.load_model(trained), exported)
    assert path == os.path.join(str(exported), "2")
    assert sorted(os.listdir(exported)) == ["1", "2"]  # no temporary folder left behind


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


def test_export_folder_that_is_a_file(trained, tmp_path, capsys):
    target = tmp_path / "export"
    target.write_text("")
    assert evaluate.main([str(trained), "--skip-eval", "--export", str(target)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ REST client


class _StubServing(http.server.BaseHTTPRequestHandler):
    received = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.path, self.headers["Content-Type"], body))
        n = len(body["instances"])
        probs = [[0.0] * 100 for _ in range(n)]
        for p in probs:
            p[3], p[30], p[55], p[8], p[99] = 0.5, 0.2, 0.1, 0.05, 0.04
        reply = {"predictions": [{"probabilities": p, "top5_classes": [3, 30, 55, 8, 99]} for p in probs]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_client_sends_the_tf_serving_rest_body(tmp_path, capsys):
    from PIL import Image

    images = _images(2, seed=3)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(image).save(paths[-1])
    server = http.server.HTTPServer(("127.0.0.1", 0), _StubServing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert client.main([*paths, "--server", f"http://127.0.0.1:{port}", "--model", "nam"]) == 0
    finally:
        server.shutdown()
    path, content_type, body = _StubServing.received[-1]
    assert path == "/v1/models/nam:predict" and content_type == "application/json"
    assert body == {"signature_name": "serving_default",
                    "instances": [{"images": image.tolist()} for image in images]}
    out = capsys.readouterr().out
    assert f"{paths[0]}: bear 50.0%, dolphin 20.0%, otter 10.0%, bicycle 5.0%, worm 4.0%" in out


def test_client_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 32, 32, 3\)"):
        client.build_request(np.zeros((1, 32, 32, 3), np.float32))
    bad = tmp_path / "x.png"
    bad.write_text("not an image")
    assert client.main([str(bad)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert client.predict_url("localhost:8501", "nam", 2) == "http://localhost:8501/v1/models/nam/versions/2:predict"
