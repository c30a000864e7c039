"""The benchmarks' shared harness: arguments, timing, FLOP counting, matmul
peak, compiled models, JSON output, and the check of hand-written NAM variants
against `NAMAttention`.

Run the benchmarks from the repository root with the project installed
(`make test` installs it into .venv with `pip install -e .`):
`.venv/bin/python bench/train_step.py`.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np


def parser(doc, steps, warmup):
    """An ArgumentParser with the options every benchmark takes.

    Args:
        doc: the script's docstring (its first line is the description).
        steps: default number of timed repetitions (`--steps`).
        warmup: default number of untimed repetitions first (`--warmup`).
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--steps", type=int, default=steps, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p


def add_model_arguments(p, batch_size=64):
    """`--depth`, `--width`, `--batch-size` of the ResNet under test."""
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=batch_size)
    return p


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
    """Writes `payload` (plus the machine) to `path` when a path is given."""
    if path:
        with open(path, "w") as f:
            json.dump({"machine": machine(), **payload}, f, indent=2, default=str)
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


def compiled_resnet(depth, width, precision, xla, attention="nam", attention_kwargs=None, **build):
    """A fresh ResNet under `precision`, compiled for training as train.py does
    (`build`: more arguments of `build_resnet`, e.g. `fuse_attention=False`)."""
    from nam_keras import TorchSGD, build_resnet

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = build_resnet(
        depth=depth,
        width=width,
        attention=attention,
        attention_kwargs=attention_kwargs if attention else None,
        dtype=precision,
        **build,
    )
    optimizer = TorchSGD(0.01)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        jit_compile=xla,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def check_against_nam(variant, layer, x, rtol=1e-4, atol=1e-5):
    """Asserts that `variant(x)` equals `layer(x, training=True)` (a built
    `NAMAttention`, channel only), values and gradients with respect to the
    input and to the layer's gamma and beta, before the variant is timed.

    `variant(x, gamma, beta)` is a hand-written NAM forward pass in training
    mode (batch statistics). Raises `AssertionError` on a mismatch.
    """
    import tensorflow as tf

    gamma, beta = layer.channel_bn.gamma, layer.channel_bn.beta

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = fn()
            loss = tf.reduce_sum(out * tf.cos(out))  # not a plain sum: a non-trivial dL/dout
        return [out, *tape.gradient(loss, [x, gamma, beta])]

    want = grads(lambda: layer(x, training=True))
    got = grads(lambda: variant(x, gamma, beta))
    for name, a, b in zip(("output", "d/dx", "d/dgamma", "d/dbeta"), got, want):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=f"{name} differs"
        )
