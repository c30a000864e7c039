"""Training images/s of the CIFAR ResNet: plain, NAM (fused with its BN, and unfused), SE.

    python bench/train_step.py                      # depth 50, batch 64, XLA off, float32 and bf16
    python bench/train_step.py --modules nam,nam_unfused --precisions float32 --steps 9
    python bench/train_step.py --bn keras,fused     # every BN on Keras' path, then fused

Per precision, XLA setting and BN kind (`--bn keras`: every BN on Keras' own
path, `fused_kernels(False)`; `fused`: TensorFlow's fused kernel, the
default), every model of `--modules` is built fresh in this one process,
warmed up, and then timed in turns, one compiled train step each per round
on one batch already in memory (no input pipeline), so that other load on the
machine reaches every model alike: median of `--steps` rounds. Prints
images/s and the step time relative to the plain ResNet's (`nam`: the
default `BatchNormNAM`; `nam_unfused`: `build_resnet(fuse_attention=False)`,
the BN then `NAMAttention`), and keeps the achieved fraction of the matmul
peak measured in the same run in the JSON (float32 matmul for float32,
bfloat16 for mixed_bfloat16, float16 for mixed_float16).
"""

import json
import statistics

import harness
import numpy as np
import tensorflow as tf

from nam_keras.layers.normalization import fused_kernels
from nam_keras.models.resnet import forward_multiply_adds

PEAK_DTYPE = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


#: the models of one configuration: (label, attention, build_resnet arguments)
MODELS = {
    "baseline": (None, {}),
    "nam": ("nam", {}),
    "nam_unfused": ("nam", {"fuse_attention": False}),
    "se": ("se", {}),
}


def batch(size):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (size, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 100, (size,)).astype("int32"))
    return x, y


def measure(
    depth, width, batch_size, precision, xla, attention, steps, warmup, bn="fused", **build
):
    """One model's compiled train step on a batch in memory: median of `steps`."""
    with fused_kernels(bn == "fused"):
        model = harness.compiled_resnet(depth, width, precision, xla, attention, **build)
    median, times = harness.timed(harness.train_step_fn(model, *batch(batch_size)), steps, warmup)
    return _figures(model, batch_size, median, times)


def _figures(model, batch_size, median, times):
    return {
        "step_s": median,
        "times_s": times,
        "images_per_s": batch_size / median,
        "forward_macs_per_image": forward_multiply_adds(model),
        "parameters": model.count_params(),
    }


def measure_interleaved(args, precision, xla, bn, kwargs):
    """Every model of `MODELS` built and warmed up, then timed in turns (one step
    each per round, `--steps` rounds), so that a machine's drift or other load
    reaches every model alike: `{label: figures}`."""
    steps, x_y = {}, batch(args.batch_size)
    for label in args.modules:
        attention, build = MODELS[label]
        attention_kwargs = kwargs if attention == "nam" else None
        with fused_kernels(bn == "fused"):
            model = harness.compiled_resnet(
                args.depth, args.width, precision, xla, attention, attention_kwargs, **build
            )
        steps[label] = (model, harness.train_step_fn(model, *x_y))
        for _ in range(args.warmup):
            steps[label][1]()
    times = {label: [] for label in steps}
    for _ in range(args.steps):
        for label, (_, step) in steps.items():
            times[label].append(harness.timed(step, 1, 0)[0])
    return {
        label: _figures(steps[label][0], args.batch_size, statistics.median(t), t)
        for label, t in times.items()
    }


def measure_row(args, precision, xla, bn, peak):
    """Every module of one configuration, with its step time relative to the baseline."""
    res = measure_interleaved(args, precision, xla, bn, json.loads(args.attention_kwargs))
    for r in res.values():
        r["utilisation"] = r["images_per_s"] * 3 * 2 * r["forward_macs_per_image"] / peak
        r["vs_baseline"] = r["step_s"] / res["baseline"]["step_s"]
    return {"precision": precision, "xla": xla, "bn": bn, "models": res}


def format_row(r):
    cells = "".join(
        f"{m['images_per_s']:>11.1f} {m['vs_baseline']:>5.2f}x" for m in r["models"].values()
    )
    return f"{r['precision']:<16}{'on' if r['xla'] else 'off':<5}{r['bn']:<7}{cells}"


def main(argv=None):
    p = harness.add_model_arguments(harness.parser(__doc__, steps=5, warmup=2))
    p.add_argument("--precisions", default="float32,mixed_bfloat16")
    p.add_argument("--xla", default="off", help="comma list of off/on")
    p.add_argument("--bn", default="fused", help="comma list of keras/fused")
    p.add_argument(
        "--modules",
        default=",".join(MODELS),
        help="comma list of " + ",".join(MODELS) + " (the baseline is always first)",
    )
    p.add_argument(
        "--attention-kwargs",
        default="{}",
        help="JSON arguments of the NAM layers, e.g. '{\"float32_gate\": true}'",
    )
    args = p.parse_args(argv)
    args.modules = list(dict.fromkeys(["baseline", *args.modules.split(",")]))
    unknown = sorted(set(args.modules) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown modules {unknown}; expected some of {list(MODELS)}")

    precisions = args.precisions.split(",")
    peaks = {pr: harness.matmul_peak_flops(PEAK_DTYPE[pr]) for pr in precisions}
    header = f"{'precision':<16}{'XLA':<5}{'BN':<7}" + "".join(
        f"{m + ' img/s':>18}" for m in args.modules
    )
    print(header + "   (img/s, step time vs baseline)")
    rows = []
    for precision in precisions:
        for xla in [x == "on" for x in args.xla.split(",")]:
            for bn in args.bn.split(","):
                rows.append(measure_row(args, precision, xla, bn, peaks[precision]))
                print(format_row(rows[-1]), flush=True)
    macs = rows[0]["models"]["baseline"]["forward_macs_per_image"]
    print(
        f"\nmachine: {harness.machine()}; ResNet-{args.depth} width {args.width}, "
        f"batch {args.batch_size}, {macs / 1e9:.3f} G multiply-adds/image forward; "
        f"median of {args.steps} rounds, the models timed in turn; matmul peak "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    )
    harness.write_json(args.json, {"args": vars(args), "matmul_peak_flops": peaks, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
