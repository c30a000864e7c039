"""Shared helpers of the benchmarks (timing, FLOP counting, matmul peak, output)."""

import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402


def machine():
    """A one-line description of this machine."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores"


def timed(fn, steps, warmup):
    """Median and all wall times (s) of `fn()` over `steps` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def forward_macs(model):
    """Multiply-adds of one forward pass per image (convolutions and dense layers)."""
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in, _ = layer.kernel.shape
            macs += h * w * kh * kw * c_in * c_out
        elif isinstance(layer, keras.layers.Dense):
            macs += int(np.prod(layer.kernel.shape))
    return macs


def matmul_peak_flops(dtype, n=2048, repeats=10):
    """Best measured FLOP/s of an n x n x n matmul in `dtype` on this machine."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    mm = tf.function(lambda: tf.matmul(a, b))
    mm().numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm().numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def write_json(path, payload):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"-> {path}")


def train_step_fn(model, x, y):
    """One compiled training step on in-memory data (no input pipeline)."""
    import tensorflow as tf

    model.train_on_batch(x, y)  # builds the optimizer and the metrics
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

    def step():
        logs = model.train_function(iterator)
        # wait for the step to finish
        keras.ops.convert_to_numpy(logs["loss"])

    return step


def compiled_resnet(depth, width, precision, xla, attention="nam"):
    """A fresh ResNet under `precision`, compiled for training as train.py does."""
    from nam_keras import build_resnet
    from nam_keras.training import TorchSGD

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = build_resnet(depth=depth, width=width, attention=attention)
    model.compile(optimizer=TorchSGD(0.01), jit_compile=xla,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model
