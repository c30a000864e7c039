"""Training cost of every attention module: the CIFAR ResNet with NAM, SE, CBAM, BAM or none.

    python bench/attention_modules.py                   # ResNet-50, batch 64, auto precision
    python bench/attention_modules.py --depth 18 --precision float32

One compiled train step on a batch in memory per module (bench/train_step.py's
`measure`), median of --steps after --warmup, in one process: images/s, the
cost relative to the plain ResNet, parameters and forward multiply-adds.
"""

import harness
from train_step import measure

from nam_keras.training.distribute import accelerators, resolve_jit, resolve_precision

MODULES = (None, "nam", "se", "cbam", "bam")


def main(argv=None):
    p = harness.add_model_arguments(harness.parser(__doc__, steps=5, warmup=2))
    p.add_argument("--precision", default="auto", help="auto (as train.py picks) or a policy")
    args = p.parse_args(argv)
    gpus = accelerators()
    precision = resolve_precision(args.precision, gpus)
    xla = resolve_jit("auto", gpus)
    rows = []
    print(f"{'module':<10}{'parameters':>13}{'G MACs':>9}{'img/s':>9}{'step vs plain':>15}")
    for attention in MODULES:
        r = measure(args.depth, args.width, args.batch_size, precision, xla, attention,
                    args.steps, args.warmup)  # fmt: skip
        r["module"] = attention or "baseline"
        r["cost"] = r["step_s"] / rows[0]["step_s"] if rows else 1.0
        rows.append(r)
        print(
            f"{r['module']:<10}{r['parameters']:>13,}{r['forward_macs_per_image'] / 1e9:>9.3f}"
            f"{r['images_per_s']:>9.1f}{r['cost']:>14.2f}x",
            flush=True,
        )
    print(
        f"\nmachine: {harness.machine()}; ResNet-{args.depth} width {args.width}, batch "
        f"{args.batch_size}, {precision}, XLA {'on' if xla else 'off'}; "
        f"median of {args.steps} steps"
    )
    harness.write_json(args.json, {"args": vars(args), "precision": precision, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
