"""Latency (batch 1, p50/p99) and throughput (batch 128) of exported SavedModels.

    python bench/serving.py                   # exports untrained ResNet-50s: baseline, NAM
                                              # (BatchNormNAM) and NAM unfused (BN, NAMAttention)
    python bench/serving.py --saved-model export/nam/1
    python bench/serving.py --xla --throughput-calls 7   # the Keras models, with and without XLA

Calls the `serving_default` signature through `tf.saved_model.load`, as TF
Serving's session would run the same graph. The batch-128 calls of the models
are timed in turns (one call each per round), so that other load on the
machine reaches each alike; the throughput is also given relative to the first
model's (the baseline's), and so is the process CPU time of a call (median of the
per-round ratios): on a machine shared with other work the wall times of a round
vary up to 2x, the CPU time a call takes by a few percent.
"""

import os
import tempfile
import time

import harness
import numpy as np
import tensorflow as tf


def export_fresh(attention, **build):
    """Exports an (untrained) ResNet-50 with `attention` ("nam" or None)."""
    from nam_keras import build_resnet
    from nam_keras.serving.export import export_saved_model

    model = build_resnet(attention=attention, **build)
    return export_saved_model(model, os.path.join(tempfile.mkdtemp(), "m"))


def in_turns(calls, rounds):
    """`(wall, cpu)`: per key of `calls` (`{key: fn}`), the wall and process-CPU
    seconds of each call, one call of each per round, so that other load on the
    machine reaches each alike."""
    wall, cpu = ({key: [] for key in calls} for _ in range(2))
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.process_time()
            wall[key].append(harness.timed(call, 1, 0)[0])
            cpu[key].append(time.process_time() - start)
    return wall, cpu


def median_ratio(times, reference):
    """The median of the per-round ratios `times / reference`."""
    return float(np.median(np.array(times) / np.array(reference)))


def measure(paths, args):
    """Batch-1 latency percentiles of each SavedModel, then the batch-128
    throughput of all of them, timed in turns."""
    rng = np.random.default_rng(0)
    one = tf.constant(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    many = tf.constant(rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8))
    serves = {
        label: tf.saved_model.load(p).signatures["serving_default"] for label, p in paths.items()
    }

    def call(serve, images):
        return lambda: serve(images=images)["probabilities"].numpy()

    rows = {}
    for label, serve in serves.items():
        _, lat = harness.timed(call(serve, one), args.steps, args.warmup)
        rows[label] = {f"p{q}_ms": np.percentile(lat, q) * 1e3 for q in (50, 99)}
        for _ in range(2):  # warm-up of the batch of 128
            call(serve, many)()
    calls = {label: call(serve, many) for label, serve in serves.items()}
    times, cpu = in_turns(calls, args.throughput_calls)
    first = np.median(next(iter(times.values())))
    first_cpu = next(iter(cpu.values()))
    for label, t in times.items():
        rows[label]["throughput_images_per_s"] = 128 / np.median(t)
        rows[label]["time_vs_first"] = np.median(t) / first
        rows[label]["cpu_time_vs_first"] = median_ratio(cpu[label], first_cpu)
    return rows


def measure_xla(args, batch=128):
    """The inference of untrained ResNet-50s (baseline, NAM) in this process, as
    `tf.function`s without and with XLA (`jit_compile`; what a SavedModel's
    function would be with it), timed in turns: `{label: {xla: figures}}`."""
    from nam_keras import build_resnet

    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, 32, 32, 3)), tf.float32)
    calls = {}
    for label, attention in (("baseline", None), ("nam", "nam")):
        model = build_resnet(attention=attention)
        for xla in (False, True):
            fn = tf.function(
                lambda x, m=model: tf.nn.softmax(m(x, training=False)), jit_compile=xla
            )
            calls[label, xla] = lambda fn=fn: fn(images).numpy()
            for _ in range(2):  # compiles, then runs once more untimed
                calls[label, xla]()
    _, cpu = in_turns(calls, args.throughput_calls)
    rows = {}
    for (label, xla), times in cpu.items():
        rows.setdefault(label, {})[f"xla={xla}"] = {
            "cpu_ms_per_image": 1e3 * float(np.median(times)) / batch,
            "cpu_time_vs_baseline": median_ratio(times, cpu["baseline", xla]),
        }
    return rows


def main(argv=None):
    p = harness.parser(__doc__, steps=200, warmup=10)
    p.add_argument(
        "--saved-model",
        help="a version folder; default: export fresh ResNet-50s "
        "(baseline and NAM, Keras BN and fused BN)",
    )
    p.add_argument("--throughput-calls", type=int, default=10)
    p.add_argument(
        "--xla",
        action="store_true",
        help="instead: the Keras models in this process, without and with XLA (batch 128)",
    )
    args = p.parse_args(argv)
    if args.xla:
        rows = measure_xla(args)
        print(f"machine: {harness.machine()}; batch 128, median of {args.throughput_calls} rounds")
        for label, by_xla in rows.items():
            for xla, r in by_xla.items():
                print(
                    f"{label:<10} {xla:<10} {r['cpu_ms_per_image']:6.2f} ms CPU per image, "
                    f"{r['cpu_time_vs_baseline']:.3f}x the baseline's CPU time",
                    flush=True,
                )
        harness.write_json(args.json, {"xla_rows": rows})
        return rows

    if args.saved_model:
        models = {args.saved_model: args.saved_model}
    else:
        models = {
            "baseline": export_fresh(None),
            "nam": export_fresh("nam"),
            "nam_unfused": export_fresh("nam", fuse_attention=False),
        }
    print(
        f"machine: {harness.machine()}; batch-1 latency over {args.steps} calls, "
        f"batch-128 throughput median of {args.throughput_calls} rounds"
    )
    rows = measure(models, args)
    for label, r in rows.items():
        print(
            f"{label:<24} batch 1: p50 {r['p50_ms']:6.1f} ms, p99 {r['p99_ms']:6.1f} ms; "
            f"batch 128: {r['throughput_images_per_s']:6.0f} images/s "
            f"({r['time_vs_first']:.3f}x the first's time, "
            f"{r['cpu_time_vs_first']:.3f}x its CPU time)",
            flush=True,
        )
    harness.write_json(args.json, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
