"""Training images/s of the CIFAR ResNet with and without NAM, per precision and XLA.

    python bench/train_step.py                      # depth 50, batch 64, all 8 configurations
    python bench/train_step.py --depth 18 --batch-size 128 --precisions float32 --xla off

Each configuration is built fresh in this one process and timed on one batch
already in memory (no input pipeline): median of --steps compiled train steps
after --warmup. Prints images/s, the NAM overhead (NAM step time / baseline
step time, same precision and XLA setting) and the achieved FLOP/s as a
fraction of the matmul peak measured in the same run (float32 matmul for
float32, bfloat16 for mixed_bfloat16, float16 for mixed_float16).
"""

import harness
import keras
import numpy as np
import tensorflow as tf

PEAK_DTYPE = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def measure(depth, width, batch, precision, xla, attention, steps, warmup):
    model = harness.compiled_resnet(depth, width, precision, xla, attention)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 100, (batch,)).astype("int32"))
    median, times = harness.timed(harness.train_step_fn(model, x, y), steps, warmup)
    macs = harness.forward_macs(model)
    keras.mixed_precision.set_global_policy("float32")
    return {
        "step_s": median,
        "times_s": times,
        "images_per_s": batch / median,
        "forward_macs_per_image": macs,
    }


def main(argv=None):
    p = harness.add_model_arguments(harness.parser(__doc__, steps=5, warmup=2))
    p.add_argument("--precisions", default="float32,mixed_bfloat16")
    p.add_argument("--xla", default="off,on", help="comma list of off/on")
    args = p.parse_args(argv)

    precisions = args.precisions.split(",")
    peaks = {pr: harness.matmul_peak_flops(PEAK_DTYPE[pr]) for pr in precisions}
    rows = []
    for precision in precisions:
        for xla in [x == "on" for x in args.xla.split(",")]:
            res = {}
            for attention in (None, "nam"):
                r = measure(
                    args.depth,
                    args.width,
                    args.batch_size,
                    precision,
                    xla,
                    attention,
                    args.steps,
                    args.warmup,
                )
                train_flops = 3 * 2 * r["forward_macs_per_image"]  # forward + backward ~ 3x forward
                r["utilisation"] = r["images_per_s"] * train_flops / peaks[precision]
                res["nam" if attention else "baseline"] = r
            rows.append(
                {
                    "precision": precision,
                    "xla": xla,
                    **res,
                    "nam_overhead": res["nam"]["step_s"] / res["baseline"]["step_s"],
                }
            )
            b, n = res["baseline"], res["nam"]
            print(
                f"{precision:<15} XLA {'on ' if xla else 'off'}"
                f"  baseline {b['images_per_s']:7.1f} img/s"
                f"  NAM {n['images_per_s']:7.1f} img/s  overhead {rows[-1]['nam_overhead']:.3f}x"
                f"  utilisation {n['utilisation']:.0%} of {peaks[precision] / 1e9:.0f} GFLOP/s",
                flush=True,
            )
    macs = rows[0]["nam"]["forward_macs_per_image"]
    print(
        f"\nmachine: {harness.machine()}; ResNet-{args.depth} width {args.width}, "
        f"batch {args.batch_size}, {macs / 1e9:.3f} G multiply-adds/image forward; "
        f"median of {args.steps} steps"
    )
    print(
        f"{'precision':<16}{'XLA':<5}{'baseline img/s':>15}{'NAM img/s':>11}"
        f"{'NAM overhead':>14}{'util (NAM)':>12}"
    )
    for r in rows:
        print(
            f"{r['precision']:<16}{'on' if r['xla'] else 'off':<5}"
            f"{r['baseline']['images_per_s']:>15.1f}{r['nam']['images_per_s']:>11.1f}"
            f"{r['nam_overhead']:>13.3f}x{r['nam']['utilisation']:>12.1%}"
        )
    harness.write_json(args.json, {"args": vars(args), "matmul_peak_flops": peaks, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
