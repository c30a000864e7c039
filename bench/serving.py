"""Latency (batch 1, p50/p99) and throughput (batch 128) of exported SavedModels.

    python bench/serving.py                   # exports untrained ResNet-50s: baseline and NAM,
                                              # each with Keras' BN and with the fused BN
    python bench/serving.py --saved-model export/nam/1

Calls the `serving_default` signature through `tf.saved_model.load`, as TF
Serving's session would run the same graph.
"""

import os
import tempfile

import harness
import numpy as np
import tensorflow as tf


def export_fresh(attention, bn):
    """Exports an (untrained) ResNet-50 with `attention` ("nam" or None)."""
    from nam_keras import build_resnet
    from nam_keras.layers.normalization import fused_kernels
    from nam_keras.serving.export import export_saved_model

    with fused_kernels(bn == "fused"):
        model = build_resnet(attention=attention)
    return export_saved_model(model, os.path.join(tempfile.mkdtemp(), "m"))


def measure(path, args):
    """Batch-1 latency percentiles and batch-128 throughput of one SavedModel."""
    serve = tf.saved_model.load(path).signatures["serving_default"]
    rng = np.random.default_rng(0)
    one = tf.constant(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    many = tf.constant(rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8))

    def call(images):
        return lambda: serve(images=images)["probabilities"].numpy()

    _, lat = harness.timed(call(one), args.steps, args.warmup)
    median, _ = harness.timed(call(many), args.throughput_calls, 2)
    return {
        "p50_ms": np.percentile(lat, 50) * 1e3,
        "p99_ms": np.percentile(lat, 99) * 1e3,
        "throughput_images_per_s": 128 / median,
    }


def main(argv=None):
    p = harness.parser(__doc__, steps=200, warmup=10)
    p.add_argument(
        "--saved-model",
        help="a version folder; default: export fresh ResNet-50s "
        "(baseline and NAM, Keras BN and fused BN)",
    )
    p.add_argument("--throughput-calls", type=int, default=10)
    args = p.parse_args(argv)

    if args.saved_model:
        models = {args.saved_model: args.saved_model}
    else:
        models = {
            f"{a or 'baseline'}, {bn} BN": export_fresh(a, bn)
            for bn in ("keras", "fused")
            for a in (None, "nam")
        }
    print(
        f"machine: {harness.machine()}; batch-1 latency over {args.steps} calls, "
        f"batch-128 throughput median of {args.throughput_calls}"
    )
    rows = {}
    for label, path in models.items():
        rows[label] = r = measure(path, args)
        print(
            f"{label:<24} batch 1: p50 {r['p50_ms']:6.1f} ms, p99 {r['p99_ms']:6.1f} ms; "
            f"batch 128: {r['throughput_images_per_s']:6.0f} images/s",
            flush=True,
        )
    harness.write_json(args.json, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
