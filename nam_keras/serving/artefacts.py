"""The models `evaluate.py` reads: what it exports, so the artefact deployed can be checked.

- a `.keras` file (`train.py`'s output): the Keras model, with its NAM report;
- a SavedModel version folder (`evaluate.py --export DIR` writes `DIR/<version>/`):
  its `serving_default` signature, uint8 images in, `probabilities` out;
- a LiteRT `.tflite` file (`--export-tflite`), run with `ai-edge-litert`;
- an ONNX `.onnx` file (`--export-onnx`), run with `onnxruntime`.

`load(path)` tells them apart by their content and returns an `Artefact` whose
`scores(images, batch_size)` maps uint8 images (N, 32, 32, 3) to class scores
(N, 100) whose softmax is the model's probabilities: logits for a Keras model,
log-probabilities for the others.
"""

import dataclasses
import os
import zipfile

import numpy as np

from nam_keras import console
from nam_keras.cifar100 import IMAGE_SHAPE, NUM_CLASSES
from nam_keras.errors import ModelError

#: kind -> how messages name it
KINDS = {
    "keras": "a .keras file",
    "saved_model": "a SavedModel folder",
    "tflite": "a LiteRT .tflite file",
    "onnx": "an ONNX .onnx file",
}
EXPECTED = (
    "expected a .keras file, a SavedModel version folder (with saved_model.pb), "
    "a .tflite file or an .onnx file"
)
#: Bytes 4-7 of a LiteRT (TFLite) FlatBuffer.
TFLITE_MAGIC = b"TFL3"
#: Smallest probability taken to the log (float32's smallest normal number).
TINY = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass
class Artefact:
    """A model to evaluate: its `path`, `kind` (a key of `KINDS`), `name`, the
    Keras `model` (a .keras file only, else `None`) and `scores`, a function
    `(uint8 images, batch size) -> class scores`."""

    path: str
    kind: str
    name: str
    scores: object
    model: object = None


def kind_of(path):
    """The `KINDS` key of what is at `path`; `ModelError` naming it otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return "saved_model"
        versions = sorted(
            int(n)
            for n in os.listdir(path)
            if n.isdigit() and os.path.isfile(os.path.join(path, n, "saved_model.pb"))
        )
        if versions:
            latest = os.path.join(path, str(versions[-1]))
            raise ModelError(
                f"{path}: a folder of SavedModel versions {versions}; name one, e.g. {latest}."
            )
        raise ModelError(f"{path}: a folder without saved_model.pb; {EXPECTED}.")
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file or SavedModel folder; {EXPECTED}.")
    if zipfile.is_zipfile(path):
        return "keras"
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] == TFLITE_MAGIC:
        return "tflite"
    if path.endswith(".onnx"):
        return "onnx"
    raise ModelError(f"{path}: not a Keras model (.keras files are zip archives); {EXPECTED}.")


def load(path, load_keras):
    """The `Artefact` at `path`; `load_keras(path)` loads a .keras file (checked there)."""
    path = os.fspath(path)
    kind = kind_of(path)
    if kind == "keras":
        model = load_keras(path)
        return Artefact(path, kind, model.name, scores=None, model=model)
    loader = {"saved_model": _saved_model, "tflite": _tflite, "onnx": _onnx}[kind]
    return Artefact(path, kind, path, scores=loader(path))


def log_probabilities(probabilities):
    """`log(p)` in float64, a probability of 0 taken as `TINY`."""
    return np.log(np.maximum(np.asarray(probabilities, np.float64), TINY))


def _check(path, what, found, expected):
    if not found:
        raise ModelError(f"{path}: {what}; expected {expected}, as evaluate.py exports.")


def _batches(images, batch_size):
    for start in range(0, len(images), batch_size):
        yield np.ascontiguousarray(images[start : start + batch_size])


def _saved_model(path):
    import tensorflow as tf

    from nam_keras.serving.export import MAX_SERVING_BATCH

    try:
        serve = tf.saved_model.load(path).signatures.get("serving_default")
    except Exception as err:  # damaged protobufs and variables raise many kinds of error
        raise ModelError(
            f"{path}: cannot be loaded as a SavedModel ({type(err).__name__}: {err})."
        ) from None
    _check(path, "no serving_default signature", serve is not None, "one")
    inputs = serve.structured_input_signature[1]
    spec = inputs.get("images")
    ok = len(inputs) == 1 and spec is not None and spec.dtype == tf.uint8
    _check(
        path,
        f"serving_default takes {inputs}",
        ok and tuple(spec.shape[1:]) == IMAGE_SHAPE,
        "images uint8 (N, 32, 32, 3)",
    )
    out = serve.structured_outputs.get("probabilities")
    _check(
        path,
        f"serving_default returns {serve.structured_outputs}",
        out is not None and tuple(out.shape[1:]) == (NUM_CLASSES,),
        f"probabilities (N, {NUM_CLASSES})",
    )

    def scores(images, batch_size):
        batch_size = min(batch_size, MAX_SERVING_BATCH)
        chunks = [
            serve(images=tf.constant(b))["probabilities"] for b in _batches(images, batch_size)
        ]
        return log_probabilities(np.concatenate([c.numpy() for c in chunks]))

    return scores


def _tflite(path):
    from ai_edge_litert.interpreter import Interpreter

    try:
        with console.quietly():  # LiteRT's note on its CPU delegate
            interpreter = Interpreter(model_path=path)
            interpreter.allocate_tensors()
    except Exception as err:
        raise ModelError(
            f"{path}: cannot be loaded as a LiteRT model ({type(err).__name__}: {err})."
        ) from None
    (source, *more), (result, *others) = (
        interpreter.get_input_details(),
        interpreter.get_output_details(),
    )
    shape = tuple(source["shape_signature"][1:])
    found = f"takes {source['dtype'].__name__} {tuple(source['shape_signature'])}"
    _check(
        path,
        found,
        not more and source["dtype"] == np.uint8 and shape == IMAGE_SHAPE,
        "uint8 images (N, 32, 32, 3)",
    )
    _check(
        path,
        f"returns {tuple(result['shape_signature'])}",
        not others and result["shape_signature"][-1] == NUM_CLASSES,
        f"probabilities (N, {NUM_CLASSES})",
    )

    def scores(images, batch_size):
        chunks = []
        for batch in _batches(images, batch_size):
            if tuple(interpreter.get_input_details()[0]["shape"]) != batch.shape:
                interpreter.resize_tensor_input(source["index"], batch.shape)
                interpreter.allocate_tensors()
            interpreter.set_tensor(source["index"], batch)
            interpreter.invoke()
            chunks.append(interpreter.get_tensor(result["index"]).copy())
        return log_probabilities(np.concatenate(chunks))

    return scores


def _onnx(path):
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ModelError(
            f"{path}: cannot be loaded as an ONNX model ({type(err).__name__}: {err})."
        ) from None
    (source, *more), outputs = session.get_inputs(), session.get_outputs()
    _check(
        path,
        f"takes {source.type} {source.shape}",
        not more and source.type == "tensor(uint8)" and tuple(source.shape[1:]) == IMAGE_SHAPE,
        "uint8 images (N, 32, 32, 3)",
    )
    names = [o.name for o in outputs]
    _check(path, f"returns {names}", "probabilities" in names, "probabilities (N, 100)")

    def scores(images, batch_size):
        chunks = [
            session.run(["probabilities"], {source.name: b})[0]
            for b in _batches(images, batch_size)
        ]
        return log_probabilities(np.concatenate(chunks))

    return scores
