"""Evaluation of a trained model, as `evaluate.py` runs it, in short steps that take
an `EvalConfig`: loading, the accuracy report with its confusion matrices, the NAM
report, their plots, the exports and the JSON report.

The model is a `.keras` file or what `evaluate.py` exports from one (a SavedModel
version folder, a `.tflite` or an `.onnx` file: `serving.artefacts`), so that the
artefact deployed can be checked; the NAM report and the exports need the `.keras` file.

    from nam_keras.config import EvalConfig
    from nam_keras.reports.evaluation import evaluate
    result = evaluate(EvalConfig(model="nam.keras", json="report.json"))
    result.report["test"]["top1"]

`evaluate` checks the backend and every output path before the long
evaluation; the steps raise `ConfigError`, `DataError` or `ModelError`. The
console summary goes to the `"nam_keras"` logger, which only the command lines
print. TensorFlow (the data pipeline, the exports) is imported only when used.
"""

import dataclasses
import json
import logging
import os
import zipfile

import keras
import numpy as np

from nam_keras.cifar100 import (
    CIFAR100_COARSE_LABELS,
    CIFAR100_LABELS,
    FINE_TO_COARSE,
    IMAGE_SHAPE,
    NUM_CLASSES,
)
from nam_keras.errors import ConfigError, ModelError
from nam_keras.io import atomic_path, atomic_write_text, check_folder, check_writable, make_folder
from nam_keras.models.resnet import nam_weight_figures
from nam_keras.serving import artefacts

logger = logging.getLogger("nam_keras")

#: the plots' file names in `--plots DIR`
PLOT_NAME = "nam_weights.png"
CONFUSION_PLOT_NAME = "superclass_confusion.png"
#: EvalConfig field -> its option, for the exports (each needs the .keras file)
EXPORTS = {"export": "--export", "export_tflite": "--export-tflite", "export_onnx": "--export-onnx"}


@dataclasses.dataclass
class EvalResult:
    """What `evaluate` returns: the loaded Keras model (`None` for a SavedModel,
    .tflite or .onnx file), the report (what `--json` writes) and the paths
    written, keyed `"plot"`, `"confusion_plot"`, `"export"`, `"export_tflite"`,
    `"export_onnx"` and `"json"` (those the config asked for)."""

    model: keras.Model
    report: dict
    paths: dict


# ------------------------------------------------------------------ the workflow


def evaluate(config):
    """Evaluates, reports and exports as an `EvalConfig` asks; returns an `EvalResult`."""
    check_outputs(config)
    artefact = artefacts.load(config.model, load_model)
    model = artefact.model
    report = {"model": os.path.abspath(config.model), "format": artefact.kind}
    report["name"] = artefact.name
    if not config.skip_eval:
        report["test"] = evaluate_test_set(artefact, config)
        _log_lines(accuracy_lines(artefact.name, report["test"]))
    report["nam"] = None if model is None else nam_report(model, config.near_zero)
    if not (config.skip_eval and _exports(config)):  # an export alone prints only its paths
        _log_lines(nam_lines(report["nam"], config.near_zero, artefact.kind))
    paths = write_outputs(model, report, config)
    return EvalResult(model=model, report=report, paths=paths)


def _exports(config):
    """`{option: path}` of the exports `config` asks for."""
    return {opt: getattr(config, f, None) for f, opt in EXPORTS.items() if getattr(config, f, None)}


def check_outputs(config):
    """The model named, the backend and every output path usable: checked
    first, so that a bad one does not cost the whole evaluation."""
    if config.model is None:
        raise ConfigError("name the model to evaluate: EvalConfig(model=PATH.keras).")
    _check_exports(config)
    if config.json:
        check_writable(config.json, "a .json file path")
    if config.plots:
        make_folder(config.plots)
        check_writable(os.path.join(config.plots, PLOT_NAME), "a folder for plots")


def _check_exports(config):
    """The backend and the paths of the exports asked for, and a .keras model to export."""
    exports = _exports(config)
    if not exports:
        return
    from nam_keras.serving import export

    for option in exports:
        export.check_backend(option)
    if config.export:
        if os.path.exists(config.export) and not os.path.isdir(config.export):
            raise ConfigError(
                f"--export: {config.export!r} is a file; expected a folder (its versions go in it)."
            )
        check_folder(config.export)  # creatable: no file above it, names not too long
    for option, suffix in (("--export-tflite", ".tflite"), ("--export-onnx", ".onnx")):
        if option in exports:
            check_writable(exports[option], f"a {suffix} file path")
    kind = artefacts.kind_of(config.model) if os.path.exists(config.model) else "keras"
    if kind != "keras":
        raise ConfigError(
            f"{', '.join(exports)}: exports are made from a .keras file; {config.model} is "
            f"{artefacts.KINDS[kind]}."
        )


def write_outputs(model, report, config):
    """The plot, the exports (their paths go into `report`) and the JSON
    report, as `config` asks; returns the paths written."""
    paths = {}
    if config.plots and report["nam"] is not None:
        paths["plot"] = plot_nam_report(report["nam"], os.path.join(config.plots, PLOT_NAME))
        logger.info(f"NAM plot -> {paths['plot']}")
    if config.plots and "test" in report:
        path = os.path.join(config.plots, CONFUSION_PLOT_NAME)
        paths["confusion_plot"] = plot_superclass_confusion(report["test"], report["name"], path)
        logger.info(f"superclass confusion plot -> {path}")
    if _exports(config):
        paths.update(export_model(model, report, config))
    if config.json:
        atomic_write_text(config.json, json.dumps(report, indent=2) + "\n")
        paths["json"] = config.json
        logger.info(f"report -> {config.json}")
    return paths


def export_model(model, report, config):
    """The SavedModel, LiteRT and ONNX models `config` asks for; their paths
    are added to `report` and returned."""
    from nam_keras.serving import export

    if config.export:
        report["export"] = export.export_saved_model(model, config.export)
        logger.info(
            f"SavedModel for TF Serving -> {report['export']} (signature serving_default: "
            "images uint8 (N, 32, 32, 3) -> probabilities, top5_classes)"
        )
    if config.export_tflite:
        report["export_tflite"] = export.export_tflite(
            model, config.export_tflite, config.tflite_quantize
        )
        logger.info(
            f"LiteRT model -> {report['export_tflite']} (weights {config.tflite_quantize}; "
            "images uint8 (N, 32, 32, 3) -> probabilities)"
        )
    onnx_path = config.export_onnx
    if onnx_path:
        report["export_onnx"] = export.export_onnx(model, onnx_path)
        logger.info(f"ONNX model -> {onnx_path} (images uint8 (N, 32, 32, 3) -> probabilities)")
    return {key: report[key] for key in EXPORTS if key in report}


def _log_lines(lines):
    for line in lines:
        logger.info(line)


# ------------------------------------------------------------------ the steps


def load_model(path):
    """`keras.models.load_model` with clear errors for what evaluate.py needs."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file; expected a .keras file.")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a Keras model (.keras files are zip archives).")
    try:
        model = keras.models.load_model(path)
    except Exception as err:
        raise ModelError(
            f"{path}: cannot be loaded as a Keras model ({type(err).__name__}: {err})."
        ) from None
    shape = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    if shape != IMAGE_SHAPE:
        raise ModelError(
            f"{path}: the model takes inputs of shape {model.input_shape}; expected "
            f"(None, 32, 32, 3) CIFAR images."
        )
    outputs = model.output_shape
    if isinstance(outputs, list) or tuple(outputs[1:]) != (NUM_CLASSES,):
        raise ModelError(
            f"{path}: the model's output has shape {outputs}; expected (None, {NUM_CLASSES}): "
            "one score per CIFAR-100 class."
        )
    return model


def accuracy_report(logits, labels, worst=10):
    """Loss (cross-entropy), top-1, top-5, per-class accuracy, the worst classes,
    the superclass figures (`superclass_report`) and the confusion matrices:
    `confusion_matrix` (100 x 100) and `superclass_confusion_matrix` (20 x 20),
    rows the true class, columns the predicted one, counts of images."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    loss = float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(axis=1)
    per_class = {}
    for c, name in enumerate(CIFAR100_LABELS):
        mask = labels == c
        if mask.any():
            per_class[name] = float(hit1[mask].mean())
    worst_classes = sorted(per_class.items(), key=lambda kv: (kv[1], kv[0]))[:worst]
    return {
        "examples": len(labels),
        "loss": loss,
        "top1": float(hit1.mean()),
        "top5": float(hit5.mean()),
        "per_class_accuracy": per_class,
        "worst_classes": [{"class": n, "accuracy": a} for n, a in worst_classes],
        **superclass_report(top5[:, 0], labels),
        **confusion_matrices(top5[:, 0], labels),
    }


def confusion_matrices(predicted, labels):
    """`confusion_matrix` (classes) and `superclass_confusion_matrix` (CIFAR-100's
    20 superclasses) as lists of rows: row = true class, column = predicted class,
    each cell a count of images."""
    table = np.asarray(FINE_TO_COARSE)
    out = {}
    for key, truth, guess, size in (
        ("confusion_matrix", labels, predicted, NUM_CLASSES),
        (
            "superclass_confusion_matrix",
            table[labels],
            table[predicted],
            len(CIFAR100_COARSE_LABELS),
        ),
    ):
        counts = np.zeros((size, size), np.int64)
        np.add.at(counts, (truth, guess), 1)
        out[key] = counts.tolist()
    return out


def superclass_report(predicted, labels):
    """CIFAR-100's 20 superclasses: how often the predicted class is in the
    right superclass, the "near misses" (wrong class, right superclass), and
    per superclass its images' class and superclass accuracy."""
    table = np.asarray(FINE_TO_COARSE)
    true_coarse, pred_coarse = table[labels], table[predicted]
    same = pred_coarse == true_coarse
    hit = predicted == labels
    per = {}
    for c, name in enumerate(CIFAR100_COARSE_LABELS):
        mask = true_coarse == c
        if mask.any():
            per[name] = {
                "examples": int(mask.sum()),
                "top1": float(hit[mask].mean()),
                "superclass_top1": float(same[mask].mean()),
            }
    return {
        "superclass_top1": float(same.mean()),
        "near_miss": float((same & ~hit).mean()),
        "per_superclass": per,
    }


def nam_report(model, near_zero=0.1):
    """Per NAM layer: the channel weights `|gamma| / sum |gamma|` and how many
    are below `near_zero` times the uniform weight `1 / C`
    (`models.resnet.nam_weight_figures`, as a JSON-ready dict).

    Returns `None` for a model without NAM layers.
    """
    figures = nam_weight_figures(model, near_zero)
    if figures is None:
        return None
    return {
        "near_zero_threshold": near_zero,
        "threshold_meaning": "weight < threshold * (1 / C), C = channels of the layer",
        "layers": [_nam_layer_report(entry) for entry in figures["layers"]],
        "channels": figures["channels"],
        "near_zero_channels": figures["near_zero_channels"],
        "near_zero_fraction": figures["near_zero_fraction"],
    }


def _nam_layer_report(entry):
    out = {"layer": entry["layer"]}
    for kind in ("channel", "spatial"):
        if kind not in entry:
            continue
        w, relative, below = (entry[kind][key] for key in ("weights", "relative", "near_zero"))
        out[kind] = {
            "size": int(w.size),
            "weights": w.tolist(),
            "min": float(w.min()),
            "max": float(w.max()),
            "relative_to_uniform": {
                "min": float(relative.min()),
                "median": float(np.median(relative)),
                "max": float(relative.max()),
            },
            "near_zero": below,
            "near_zero_fraction": below / w.size,
        }
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path):
    """Writes `fig` to `path` through a temporary file and a rename, then closes it."""
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_nam_report(report, path):
    """One PNG: per block, the channel weights relative to uniform, sorted."""
    plt = _pyplot()
    layers = report["layers"]
    cols = 4
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4 * cols, 2.6 * rows + 0.6), squeeze=False, layout="constrained"
    )
    threshold = report["near_zero_threshold"]
    for ax, entry in zip(axes.flat, layers):
        ch = entry["channel"]
        relative = np.sort(np.asarray(ch["weights"]) * ch["size"])[::-1]
        ax.fill_between(np.arange(relative.size), relative, color="tab:blue", alpha=0.6, step="mid")
        ax.axhline(1.0, color="black", lw=0.8, ls="--", label="uniform")
        ax.axhline(threshold, color="tab:red", lw=0.8, ls=":", label=f"{threshold:g} x uniform")
        ax.set_title(
            f"{entry['layer'].removesuffix('_nam')} (C={ch['size']}): "
            f"{ch['near_zero_fraction']:.0%} near 0",
            fontsize=9,
        )
        ax.set_xlim(0, relative.size - 1)
        ax.set_ylim(0, max(2.0, float(relative.max()) * 1.05))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"NAM channel weights |gamma|/sum|gamma| x C, sorted (1 = uniform); "
        f"{report['near_zero_fraction']:.1%} of {report['channels']} channels below "
        f"{threshold:g} x uniform",
        fontsize=11,
    )
    fig.supxlabel("channel rank", fontsize=9)
    fig.supylabel("weight / uniform weight", fontsize=9)  # the layout keeps it clear of the axes
    return _save_png(fig, path)


def plot_superclass_confusion(test, name, path):
    """One PNG: the 20 x 20 superclass confusion matrix of an `accuracy_report`,
    each row as percentages of its true superclass' images."""
    plt = _pyplot()
    counts = np.asarray(test["superclass_confusion_matrix"], np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    percent = 100 * counts / np.maximum(rows, 1)
    fig, ax = plt.subplots(figsize=(11, 10), layout="constrained")
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    for (i, j), value in np.ndenumerate(percent):
        if counts[i, j]:
            color = "white" if value > 60 else "black"
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color=color)
    ticks = np.arange(len(CIFAR100_COARSE_LABELS))
    names = [n.replace("_", " ") for n in CIFAR100_COARSE_LABELS]
    ax.set_xticks(ticks, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(ticks, [f"{n} ({int(r)})" for n, r in zip(names, rows[:, 0])], fontsize=8)
    ax.set_xlabel("predicted superclass")
    ax.set_ylabel("true superclass (images)")
    fig.colorbar(image, ax=ax, shrink=0.6, label="% of the true superclass' images")
    ax.set_title(
        f"{name}: CIFAR-100 superclasses on {test['examples']} test images; superclass top-1 "
        f"{test['superclass_top1']:.1%}, class top-1 {test['top1']:.1%}",
        fontsize=10,
    )
    return _save_png(fig, path)


def evaluate_test_set(model, config):
    """`accuracy_report` of `model` (a `keras.Model` or an `artefacts.Artefact`)
    on the test split named by an `EvalConfig`.

    With `config.tta == "flip"` each image's class probabilities are the mean
    of the image's and its mirror's (`flip_average`).
    """
    from nam_keras.data import sources

    if isinstance(model, artefacts.Artefact):
        scores = model.scores or keras_scores(model.model)
    else:
        scores = keras_scores(model)
    images, labels = sources.load_for(config, splits=("test",))["test"]
    logits = scores(images, config.batch_size)
    if config.tta == "flip":
        logits = flip_average(logits, scores(images[:, :, ::-1], config.batch_size))
    return accuracy_report(logits, labels)


def keras_scores(model):
    """`(uint8 images, batch size) -> logits` of a Keras model, through the
    evaluation pipeline (`data.pipeline.eval_pipeline`)."""
    import tensorflow as tf

    from nam_keras.data import pipeline

    def scores(images, batch_size):
        zeros = np.zeros(len(images), np.int32)  # the pipeline's labels: unused
        ds = tf.data.Dataset.from_tensor_slices((images, zeros))
        return model.predict(pipeline.eval_pipeline(ds, batch_size), verbose=1)

    return scores


def flip_average(logits, mirrored_logits):
    """Flip test-time augmentation: the logarithm of the mean of the class
    probabilities of the images and of their mirrors (logits of the mean)."""
    both = np.logaddexp(log_softmax(logits), log_softmax(mirrored_logits))
    return both - np.log(2.0)


def log_softmax(logits):
    """Row-wise log-softmax of a NumPy array, in float64, computed stably."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits):
    """Row-wise softmax of a NumPy array, in float64, computed stably."""
    return np.exp(log_softmax(logits))


def accuracy_lines(name, test):
    """The console summary of an `accuracy_report`."""
    worst = ", ".join(f"{w['class']} {w['accuracy']:.0%}" for w in test["worst_classes"])
    lines = [
        f"{name} on {test['examples']} test images: loss {test['loss']:.4f}, "
        f"top-1 {test['top1']:.2%}, top-5 {test['top5']:.2%}",
        f"worst classes: {worst}",
    ]
    if "per_superclass" not in test:
        return lines
    lines += [
        f"superclasses: top-1 {test['superclass_top1']:.2%}; near misses (wrong class, right "
        f"superclass) {test['near_miss']:.2%} of the images",
        f"  {'superclass':<32} {'images':>6} {'top-1':>7} {'superclass top-1':>17}",
    ]
    for superclass, row in test["per_superclass"].items():
        top1, same = row["top1"], row["superclass_top1"]
        lines.append(f"  {superclass:<32} {row['examples']:>6} {top1:>7.1%} {same:>17.1%}")
    return lines


def nam_lines(report, near_zero, kind="keras"):
    """The console summary of a `nam_report` (`None`: a model without NAM, or
    `kind` another than "keras": an export, whose layers are not Keras layers)."""
    if kind != "keras":
        return [
            f"NAM report: none for {artefacts.KINDS[kind]} (no Keras layers in it); "
            "evaluate its .keras file for it."
        ]
    if report is None:
        return ["NAM report: the model has no NAM layers (a baseline); nothing to report."]
    lines = [
        f"NAM report: {len(report['layers'])} NAM layers, {report['near_zero_channels']} of "
        f"{report['channels']} channels ({report['near_zero_fraction']:.1%}) below "
        f"{near_zero:g} x the uniform weight"
    ]
    for entry in report["layers"]:
        ch = entry["channel"]
        r = ch["relative_to_uniform"]
        lines.append(
            f"  {entry['layer']:<22} C={ch['size']:<5} near zero {ch['near_zero_fraction']:6.1%}"
            f"   weight/uniform min {r['min']:.3f} median {r['median']:.3f} max {r['max']:.3f}"
        )
    return lines
