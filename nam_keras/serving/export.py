"""Export for TF Serving: a versioned SavedModel taking raw uint8 images."""

import os
import shutil
import tempfile

import keras

from nam_keras.cifar100 import IMAGE_SHAPE
from nam_keras.errors import ConfigError, ModelError
from nam_keras.io import atomic_path, current_umask

#: Largest batch one request may send (about 3 MB of pixels); larger ones are refused
#: before the model runs, instead of exhausting the server's memory.
MAX_SERVING_BATCH = 1024


#: option -> (what it writes, its argument in the hint)
EXPORT_OPTIONS = {
    "--export": ("the TF Serving export", "DIR"),  # a SavedModel
    "--export-tflite": ("the LiteRT (TFLite) export", "FILE.tflite"),
    "--export-onnx": ("the ONNX export", "FILE.onnx"),
}


def check_backend(option="--export"):
    """`ConfigError` unless Keras runs on TensorFlow, which both exports need.

    Args:
        option: the option refused, named in the message: `"--export"` (the
            SavedModel) or `"--export-tflite"` (LiteRT).
    """
    what, argument = EXPORT_OPTIONS[option]
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ConfigError(
            f"{option}: {what} needs the TensorFlow backend; KERAS_BACKEND is {backend!r}. "
            "A .keras file written under any backend loads there: run "
            f"KERAS_BACKEND=tensorflow python evaluate.py MODEL {option} {argument}."
        )


def logits_of(model, images):
    """`model(images)` in inference mode: its one output, also from a model that
    keeps its outputs in a list of one (as a loaded subclass of `keras.Model` can)."""
    logits = model(images, training=False)
    if isinstance(logits, (list, tuple)):
        (logits,) = logits
    return logits


def next_version(export_dir):
    """The next free integer version under `export_dir` (1 when empty)."""
    versions = (
        [int(n) for n in os.listdir(export_dir) if n.isdigit()] if os.path.isdir(export_dir) else []
    )
    return max(versions, default=0) + 1


def export_saved_model(model, export_dir, verbose=False):
    """Writes a TF Serving SavedModel as `export_dir/<next version>/`.

    Signature `serving_default`: input `images` uint8 (None, 32, 32, 3) raw
    pixels; outputs `probabilities` float32 (None, num_classes) and
    `top5_classes` int32 (None, 5). The version is written to a temporary
    folder and renamed, so TF Serving never sees half a model and no existing
    version is overwritten. Returns the version's path. Needs the TensorFlow
    backend (`check_backend`).
    """
    check_backend("--export")
    import tensorflow as tf

    export_dir = os.fspath(export_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ModelError(
            f"export path {export_dir} is a file; expected a folder (its versions go in it)."
        )
    os.makedirs(export_dir, exist_ok=True)
    k = min(5, int(model.output_shape[-1]))

    def serve(images):
        # A loaded signature does not check the shape itself: refuse clearly.
        images = tf.ensure_shape(images, (None, *IMAGE_SHAPE), name="images_must_be_Nx32x32x3")
        batch = tf.shape(images)[0]
        checks = [
            tf.debugging.assert_positive(batch, message="images must hold at least one image"),
            tf.debugging.assert_less_equal(
                batch, MAX_SERVING_BATCH, message=f"at most {MAX_SERVING_BATCH} images per request"
            ),
        ]
        with tf.control_dependencies(checks):
            images = tf.identity(images)
        logits = logits_of(model, tf.cast(images, tf.float32))
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        top = tf.math.top_k(probabilities, k=k).indices
        return {"probabilities": probabilities, "top5_classes": tf.cast(top, tf.int32)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serve,
        input_signature=[tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8, name="images")],
    )
    tmp = tempfile.mkdtemp(dir=export_dir, prefix=".tmp-export-")
    try:
        archive.write_out(tmp, verbose=verbose)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide it from TF Serving
        while True:  # another exporter may take a number meanwhile: never overwrite
            final = os.path.join(export_dir, str(next_version(export_dir)))
            try:
                os.rename(tmp, final)
                return final
            except OSError:
                if not os.path.exists(final):
                    raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


#: --tflite-quantize: float32 weights, float16 weights, or dynamic-range int8 weights.
TFLITE_QUANTIZATIONS = ("none", "float16", "dynamic")


def _float32_layer(layer):
    """A new layer like `layer` with the float32 policy (its sublayers follow it)."""
    return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})


def float32_copy(model):
    """`model` itself when it computes in float32, else a float32 copy with its weights
    (a model trained under mixed precision, for runtimes without bfloat16/float16 kernels).

    The copy is `keras.models.clone_model` with every layer rebuilt under the
    float32 policy."""
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    copy = keras.models.clone_model(model, clone_function=_float32_layer)
    copy.set_weights(model.get_weights())
    return copy


def export_tflite(model, path, quantize="none"):
    """Writes a LiteRT (TFLite) model: uint8 images `(N, 32, 32, 3)` in,
    probabilities `(N, num_classes)` out, the same contract as the SavedModel.

    Keras' own `model.export(format="litert")` (TensorFlow's converter) does the
    conversion; `quantize` stores the weights as float32 (`"none"`), float16, or
    int8 with dynamic-range quantisation (`"dynamic"`). The file is written to a
    temporary name and renamed (`io.atomic_path`, which also gives it the
    permissions of any new file). Returns `path`.
    """
    check_backend("--export-tflite")
    import tensorflow as tf

    if quantize not in TFLITE_QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {TFLITE_QUANTIZATIONS}; got {quantize!r}")
    path = os.fspath(path)
    if not path.endswith(".tflite"):
        raise ModelError(f"the LiteRT file name must end with .tflite; received {path!r}.")
    # converter settings, passed through `model.export(format="litert")`
    kwargs = {} if quantize == "none" else {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantize == "float16":
        kwargs["target_spec"] = {"supported_types": [tf.float16]}
    serving = probabilities_model(model, "litert")  # LiteRT's kernels have no bfloat16
    with atomic_path(path, suffix=".tflite") as tmp:
        serving.export(tmp, format="litert", input_signature=_signature(), verbose=False, **kwargs)
    return path


def probabilities_model(model, suffix):
    """`model` as a float32 Keras model from uint8 `images` (N, 32, 32, 3) to float32
    `probabilities`, named `<model name>_<suffix>`: the LiteRT and ONNX contract."""
    model = float32_copy(model)
    images = keras.Input(IMAGE_SHAPE, dtype="uint8", name="images")
    logits = logits_of(model, keras.ops.cast(images, "float32"))
    probabilities = keras.layers.Softmax(name="probabilities", dtype="float32")(logits)
    return keras.Model(images, probabilities, name=f"{model.name}_{suffix}")


def _signature():
    import tensorflow as tf

    return [tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8, name="images")]


#: What `export_onnx` needs beyond requirements.txt's TensorFlow (pinned there too).
ONNX_PACKAGES = "tf2onnx==1.17.0 onnx==1.23.2"


def export_onnx(model, path):
    """Writes an ONNX model: uint8 `images` (N, 32, 32, 3) in, `probabilities`
    (N, num_classes) out, the LiteRT model's contract; it runs with `onnxruntime`.

    `tf2onnx.convert.from_keras` converts it. Keras' own `model.export(format="onnx")`
    (tf2onnx's `from_function`) would make the fixed CIFAR-100 mean and std of the
    model's first layer, tensors its function captures, two more inputs of the graph
    that a caller would have to feed. Written through a temporary file and a rename.
    Returns `path`.
    """
    check_backend("--export-onnx")
    path = os.fspath(path)
    if not path.endswith(".onnx"):
        raise ModelError(f"the ONNX file name must end with .onnx; received {path!r}.")
    try:
        import tf2onnx
    except ImportError as err:
        raise ConfigError(
            f"--export-onnx needs tf2onnx and onnx ({err}): pip install {ONNX_PACKAGES}"
        ) from None
    serving = probabilities_model(model, "onnx")
    with atomic_path(path, suffix=".onnx") as tmp:
        tf2onnx.convert.from_keras(serving, input_signature=_signature(), output_path=tmp)
    return path
