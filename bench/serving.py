"""Latency (batch 1, p50/p99) and throughput (batch 128) of the exported SavedModel.

    python bench/serving.py                   # exports an (untrained) NAM ResNet-50 first
    python bench/serving.py --saved-model export/nam/1

Calls the `serving_default` signature through `tf.saved_model.load`, as TF
Serving's session would run the same graph.
"""

import os
import tempfile

import harness
import numpy as np
import tensorflow as tf


def main(argv=None):
    p = harness.parser(__doc__, steps=200, warmup=10)
    p.add_argument(
        "--saved-model", help="a version folder; default: export a fresh ResNet-50 + NAM"
    )
    p.add_argument("--throughput-calls", type=int, default=10)
    args = p.parse_args(argv)

    path = args.saved_model
    if path is None:
        from nam_keras import build_resnet
        from nam_keras.export import export_saved_model

        path = export_saved_model(build_resnet(), os.path.join(tempfile.mkdtemp(), "nam"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    rng = np.random.default_rng(0)
    one = tf.constant(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    many = tf.constant(rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8))

    def call(images):
        return lambda: serve(images=images)["probabilities"].numpy()

    _, lat = harness.timed(call(one), args.steps, args.warmup)
    p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
    median, _ = harness.timed(call(many), args.throughput_calls, 2)
    print(f"machine: {harness.machine()}; SavedModel {path}")
    print(f"batch 1:   p50 {p50:.1f} ms, p99 {p99:.1f} ms ({args.steps} calls)")
    print(f"batch 128: {128 / median:.0f} images/s (median of {args.throughput_calls} calls)")
    harness.write_json(
        args.json, {"p50_ms": p50, "p99_ms": p99, "throughput_images_per_s": 128 / median}
    )


if __name__ == "__main__":
    main()
