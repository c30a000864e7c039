"""Training images/s of the CIFAR ResNet with and without NAM, per precision, XLA and BN kind.

    python bench/train_step.py                      # depth 50, batch 64, XLA off, both BNs
    python bench/train_step.py --xla off,on --bn fused
    python bench/train_step.py --depth 18 --batch-size 128 --precisions float32

`--bn keras` builds every BN on Keras' own path (`fused_kernels(False)`: what
this project shipped before the fused kernel), `--bn fused` on the fused
TensorFlow kernel (the default now), so one run gives before and after.

Each configuration is built fresh in this one process and timed on one batch
already in memory (no input pipeline): median of --steps compiled train steps
after --warmup. Prints images/s, the NAM overhead (NAM step time / baseline
step time, same precision and XLA setting) and the achieved FLOP/s as a
fraction of the matmul peak measured in the same run (float32 matmul for
float32, bfloat16 for mixed_bfloat16, float16 for mixed_float16).
"""

import json

import harness
import numpy as np
import tensorflow as tf

from nam_keras.layers.normalization import fused_kernels
from nam_keras.models.resnet import forward_multiply_adds

PEAK_DTYPE = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def measure(
    depth, width, batch, precision, xla, attention, steps, warmup, bn="fused", attention_kwargs=None
):
    with fused_kernels(bn == "fused"):
        model = harness.compiled_resnet(depth, width, precision, xla, attention, attention_kwargs)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 100, (batch,)).astype("int32"))
    median, times = harness.timed(harness.train_step_fn(model, x, y), steps, warmup)
    macs = forward_multiply_adds(model)
    return {
        "step_s": median,
        "times_s": times,
        "images_per_s": batch / median,
        "forward_macs_per_image": macs,
        "parameters": model.count_params(),
    }


def measure_pair(args, precision, xla, bn, peak):
    """Baseline and NAM in one configuration, with the NAM overhead."""
    res = {}
    for attention in (None, "nam"):
        kwargs = json.loads(args.attention_kwargs)
        r = measure(
            args.depth,
            args.width,
            args.batch_size,
            precision,
            xla,
            attention,
            args.steps,
            args.warmup,
            bn,
            kwargs,
        )
        train_flops = 3 * 2 * r["forward_macs_per_image"]  # forward + backward ~ 3x forward
        r["utilisation"] = r["images_per_s"] * train_flops / peak
        res["nam" if attention else "baseline"] = r
    overhead = res["nam"]["step_s"] / res["baseline"]["step_s"]
    return {"precision": precision, "xla": xla, "bn": bn, **res, "nam_overhead": overhead}


def format_row(r):
    return (
        f"{r['precision']:<16}{'on' if r['xla'] else 'off':<5}{r['bn']:<7}"
        f"{r['baseline']['images_per_s']:>15.1f}{r['nam']['images_per_s']:>11.1f}"
        f"{r['nam_overhead']:>13.3f}x{r['baseline']['utilisation']:>12.1%}"
        f"{r['nam']['utilisation']:>12.1%}"
    )


def main(argv=None):
    p = harness.add_model_arguments(harness.parser(__doc__, steps=5, warmup=2))
    p.add_argument("--precisions", default="float32,mixed_bfloat16")
    p.add_argument("--xla", default="off", help="comma list of off/on")
    p.add_argument("--bn", default="keras,fused", help="comma list of keras/fused")
    p.add_argument(
        "--attention-kwargs",
        default="{}",
        help="JSON arguments of NAMAttention, e.g. '{\"float32_gate\": false}'",
    )
    args = p.parse_args(argv)

    precisions = args.precisions.split(",")
    peaks = {pr: harness.matmul_peak_flops(PEAK_DTYPE[pr]) for pr in precisions}
    header = (
        f"{'precision':<16}{'XLA':<5}{'BN':<7}{'baseline img/s':>15}{'NAM img/s':>11}"
        f"{'NAM overhead':>14}{'util (base)':>12}{'util (NAM)':>12}"
    )
    print(header)
    rows = []
    for precision in precisions:
        for xla in [x == "on" for x in args.xla.split(",")]:
            for bn in args.bn.split(","):
                rows.append(measure_pair(args, precision, xla, bn, peaks[precision]))
                print(format_row(rows[-1]), flush=True)
    macs = rows[0]["nam"]["forward_macs_per_image"]
    print(
        f"\nmachine: {harness.machine()}; ResNet-{args.depth} width {args.width}, "
        f"batch {args.batch_size}, {macs / 1e9:.3f} G multiply-adds/image forward; "
        f"median of {args.steps} steps; matmul peak "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    )
    print(header)
    print("\n".join(format_row(r) for r in rows))
    harness.write_json(args.json, {"args": vars(args), "matmul_peak_flops": peaks, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
