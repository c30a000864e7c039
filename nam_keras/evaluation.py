"""Evaluation behind `evaluate.py`: accuracy report, NAM analysis, SavedModel export."""

import os
import shutil
import tempfile
import zipfile

import keras
import numpy as np

from nam_keras.data import CIFAR100_LABELS, IMAGE_SHAPE
from nam_keras.layers import NAMAttention
from nam_keras.training import atomic_path


class ModelError(ValueError):
    """The file is not a usable CIFAR-100 Keras model, or an export path is wrong."""


def load_model(path):
    """`keras.models.load_model` with clear errors for what evaluate.py needs."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file.")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a Keras model (.keras files are zip archives).")
    try:
        model = keras.models.load_model(path)
    except Exception as err:  # noqa: BLE001 - Keras raises many kinds
        raise ModelError(f"{path}: cannot be loaded as a Keras model ({type(err).__name__}: {err}).") from None
    shape = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    if shape != IMAGE_SHAPE:
        raise ModelError(
            f"{path}: the model takes inputs of shape {model.input_shape}; expected "
            f"(None, 32, 32, 3) CIFAR images."
        )
    return model


def accuracy_report(logits, labels, worst=10):
    """Loss (cross-entropy), top-1, top-5, per-class accuracy and the worst classes."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
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
        "examples": int(len(labels)),
        "loss": loss,
        "top1": float(hit1.mean()),
        "top5": float(hit5.mean()),
        "per_class_accuracy": per_class,
        "worst_classes": [{"class": n, "accuracy": a} for n, a in worst_classes],
    }


def nam_report(model, near_zero=0.1):
    """Per NAM layer: the channel weights `|gamma| / sum |gamma|` and how many
    are below `near_zero` times the uniform weight `1 / C`.

    Returns `None` for a model without NAM layers.
    """
    layers = [layer for layer in model.layers if isinstance(layer, NAMAttention)]
    if not layers:
        return None
    blocks = []
    below_total = count_total = 0
    for layer in layers:
        entry = {"layer": layer.name}
        for kind, w in layer.attention_weights().items():
            w = np.asarray(w, np.float64)
            relative = w * w.size  # 1.0 = uniform
            below = int((relative < near_zero).sum())
            entry[kind] = {
                "size": int(w.size),
                "weights": w.tolist(),
                "min": float(w.min()), "max": float(w.max()),
                "relative_to_uniform": {
                    "min": float(relative.min()), "median": float(np.median(relative)),
                    "max": float(relative.max()),
                },
                "near_zero": below,
                "near_zero_fraction": below / w.size,
            }
            if kind == "channel":
                below_total += below
                count_total += w.size
        blocks.append(entry)
    return {
        "near_zero_threshold": near_zero,
        "threshold_meaning": "weight < threshold * (1 / C), C = channels of the layer",
        "layers": blocks,
        "channels": count_total,
        "near_zero_channels": below_total,
        "near_zero_fraction": below_total / max(count_total, 1),
    }


def plot_nam_report(report, path):
    """One PNG: per block, the channel weights relative to uniform, sorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    cols = 4
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    threshold = report["near_zero_threshold"]
    for ax, entry in zip(axes.flat, layers):
        ch = entry["channel"]
        relative = np.sort(np.asarray(ch["weights"]) * ch["size"])[::-1]
        ax.fill_between(np.arange(relative.size), relative, color="tab:blue", alpha=0.6, step="mid")
        ax.axhline(1.0, color="black", lw=0.8, ls="--", label="uniform")
        ax.axhline(threshold, color="tab:red", lw=0.8, ls=":", label=f"{threshold:g} x uniform")
        ax.set_title(f"{entry['layer'].removesuffix('_nam')} (C={ch['size']}): "
                     f"{ch['near_zero_fraction']:.0%} near 0", fontsize=9)
        ax.set_xlim(0, relative.size - 1)
        ax.set_ylim(0, max(2.0, float(relative.max()) * 1.05))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"NAM channel weights |gamma|/sum|gamma| x C, sorted (1 = uniform); "
        f"{report['near_zero_fraction']:.1%} of {report['channels']} channels below "
        f"{threshold:g} x uniform", fontsize=11,
    )
    fig.supxlabel("channel rank", fontsize=9)
    fig.supylabel("weight / uniform weight", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------- export


def next_version(export_dir):
    """The next free integer version under `export_dir` (1 when empty)."""
    versions = [int(n) for n in os.listdir(export_dir) if n.isdigit()] if os.path.isdir(export_dir) else []
    return max(versions, default=0) + 1


def export_saved_model(model, export_dir, verbose=False):
    """Writes a TF Serving SavedModel as `export_dir/<next version>/`.

    Signature `serving_default`: input `images` uint8 (None, 32, 32, 3) raw
    pixels; outputs `probabilities` float32 (None, num_classes) and
    `top5_classes` int32 (None, 5). The version is written to a temporary
    folder and renamed, so TF Serving never sees half a model and no existing
    version is overwritten. Returns the version's path.
    """
    import tensorflow as tf

    export_dir = os.fspath(export_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ModelError(f"export path {export_dir} is a file; expected a folder (its versions go in it).")
    os.makedirs(export_dir, exist_ok=True)
    k = min(5, int(model.output_shape[-1]))

    def serve(images):
        # A loaded signature does not check the shape itself: refuse clearly.
        images = tf.ensure_shape(images, (None, *IMAGE_SHAPE), name="images_must_be_Nx32x32x3")
        logits = model(tf.cast(images, tf.float32), training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        top = tf.math.top_k(probabilities, k=k).indices
        return {"probabilities": probabilities, "top5_classes": tf.cast(top, tf.int32)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve,
        input_signature=[tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8, name="images")],
    )
    tmp = tempfile.mkdtemp(dir=export_dir, prefix=".tmp-export-")
    try:
        archive.write_out(tmp, verbose=verbose)
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
