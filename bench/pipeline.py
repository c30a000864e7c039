"""Images/s of the training input per CPU core, for each augmentation recipe,
and the cores it takes to feed a GPU; the device-side input for comparison.

    python bench/pipeline.py [--batch-size 256] [--steps 50] [--recipes reference,crop-flip]
                             [--threads N] [--no-device] [--json out.json]

Host rows: iterates `nam_keras.data.pipeline.train_pipeline` (`tf.data`) on
synthetic CIFAR-shaped data (the same in-memory path as the real data) after a
warm-up. "img/s per core" is images per CPU-second the process used (user +
system time of all its threads), which stays meaningful when other processes
share the cores; "wall img/s" is what this machine delivered, and "cores for
12k / 25k" is that many img/s over the per-core figure. `--threads N` caps
`tf.data`'s thread pool (default: every core).

Device rows: `nam_keras.data.device_augment.training_batch` (gather from the
uint8 training set held by the device, per-image augmentation, MixUp/CutMix)
jitted on JAX on this CPU, in a child process under `KERAS_BACKEND=jax`: what
the same work costs as XLA code (on a GPU it runs inside the train step).
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import harness

#: Recipe -> `train_pipeline` arguments. RandAugment, MixUp and CutMix come on
#: top of the reference augmentation, as `train.py --randaugment/--mixup/--cutmix` does.
RECIPES = {
    "reference": {},
    "crop-flip": {"augment": "crop-flip"},
    "randaugment": {"randaugment": True},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0},
}
#: GPU training rates to feed (img/s): one H200 today, and with headroom.
TARGETS = (12_000, 25_000)
#: Recipes with a device-side form (RandAugment draws from layer state, not a key).
DEVICE_RECIPES = ("reference", "crop-flip", "mixup", "cutmix")


def measure(batches, steps, warmup, batch_size):
    """Wall seconds and process CPU seconds of `steps` calls of `batches()`
    after `warmup`, as a row of figures."""
    for _ in range(warmup):
        batches()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        batches()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = steps * batch_size
    per_core = round(images / cpu)
    row = {"wall_images_per_s": round(images / wall), "cpu_s": round(cpu, 2)}
    row["images_per_s_per_core"] = per_core
    for target in TARGETS:
        row[f"cores_for_{target}"] = math.ceil(target / per_core)
    return row


def host_rows(args):
    """The `tf.data` pipeline's figures for each recipe of `args.recipes`."""
    import tensorflow as tf

    from nam_keras.data import pipeline

    arrays = pipeline.load_cifar100("synthetic", synthetic_sizes=(args.train_size, 16))[0]
    rows = {}
    for name in args.recipes:
        ds = pipeline.train_pipeline(arrays, args.batch_size, seed=0, repeat=True, **RECIPES[name])
        if args.threads:
            options = tf.data.Options()
            options.threading.private_threadpool_size = args.threads
            ds = ds.with_options(options)
        it = iter(ds)
        batches = lambda it=it: next(it)[0].numpy()
        rows[name] = measure(batches, args.steps, args.warmup, args.batch_size)
    return rows


def device_rows(args):
    """`device_augment.training_batch` jitted on JAX, for each recipe that has a
    device-side form (this process must run on the JAX backend)."""
    import jax
    import numpy as np

    from nam_keras.data import device_augment as da

    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (args.train_size, 32, 32, 3), dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, 100, args.train_size).astype("int32"))
    rows = {}
    for name in (r for r in args.recipes if r in DEVICE_RECIPES):
        kwargs = {"augment": "reference", **RECIPES[name]}

        def batch(x, y, step, kwargs=kwargs):
            return da.training_batch(x, y, step, 0, args.batch_size, **kwargs)

        step_fn, step = jax.jit(batch), iter(range(10**9))

        def run(step_fn=step_fn, step=step):
            jax.block_until_ready(step_fn(images, labels, np.int32(next(step))))

        rows[name] = measure(run, args.steps, max(args.warmup, 1), args.batch_size)
    return rows


def device_rows_in_child(args):
    """`device_rows` in a child process under `KERAS_BACKEND=jax`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "device.json")
        argv = [os.path.abspath(__file__), "--device-only"]
        argv += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        argv += ["--warmup", str(args.warmup), "--train-size", str(args.train_size)]
        argv += ["--recipes", ",".join(args.recipes), "--json", out]
        env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
        proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the JAX child failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)["device"]


def print_table(host, device):
    """Prints one line per row: where, recipe, wall img/s, img/s per core, cores per target."""
    head = f"{'input':<8}{'recipe':<14}{'wall img/s':>11}{'img/s/core':>12}"
    print(head + "".join(f"{f'cores {t // 1000}k':>10}" for t in TARGETS))
    for where, rows in (("host", host), ("device", device)):
        for name, r in rows.items():
            cores = "".join(f"{r[f'cores_for_{t}']:>10}" for t in TARGETS)
            print(
                f"{where:<8}{name:<14}{r['wall_images_per_s']:>11}"
                f"{r['images_per_s_per_core']:>12}{cores}"
            )


def parse(argv):
    """The command line's arguments (`--recipes` as a list, checked)."""
    parser = harness.parser(__doc__, steps=50, warmup=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated")
    parser.add_argument("--threads", type=int, help="tf.data thread pool size (default: all)")
    parser.add_argument("--no-device", action="store_true", help="skip the device-side rows")
    parser.add_argument("--device-only", action="store_true", help="only the device-side rows")
    args = parser.parse_args(argv)
    args.recipes = args.recipes.split(",")
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    return args


def main(argv=None):
    """Runs the rows, prints the table, writes `--json`; returns the figures."""
    args = parse(argv)
    if args.device_only:
        result = {"device": device_rows(args)}
        harness.write_json(args.json, result)
        return result
    host = host_rows(args)
    device = {} if args.no_device else device_rows_in_child(args)
    print(f"{harness.machine()}; batch {args.batch_size}, {args.steps} steps per row")
    print_table(host, device)
    result = {"host": host, "device": device, "batch_size": args.batch_size, "steps": args.steps}
    result["cores"] = len(os.sched_getaffinity(0))
    harness.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
