"""model.fit on the real augmented pipeline versus the bare train step on in-memory data.

    python bench/fit_vs_step.py                    # depth 50, batch 64
    python bench/fit_vs_step.py --depth 18 --width 16 --batch-size 128

Both use the same compiled model (precision `auto`, XLA off on the CPU). The
"bare" figure repeats one batch already in memory; the "fit" figure runs
`model.fit` on `pipeline.train_pipeline` (per-image augmentation, shuffling,
prefetching) over synthetic CIFAR-shaped data, which takes the same path as
the real data. The pipeline's cost is 1 - fit / bare images/s.
"""

import time

import harness

from nam_keras.data import pipeline
from nam_keras.training.distribute import accelerators, resolve_jit, resolve_precision


def main(argv=None):
    args = harness.add_model_arguments(harness.parser(__doc__, steps=10, warmup=2)).parse_args(argv)

    gpus = accelerators()
    precision, xla = resolve_precision("auto", gpus), resolve_jit("auto", gpus)
    model = harness.compiled_resnet(args.depth, args.width, precision, xla)
    n = args.batch_size * (args.steps + args.warmup)
    train, _ = pipeline.load_cifar100("synthetic", synthetic_sizes=(max(n, 1024), 16))
    x, y = next(iter(pipeline.train_pipeline(train, args.batch_size, seed=0)))

    median, _ = harness.timed(harness.train_step_fn(model, x, y), args.steps, args.warmup)
    bare = args.batch_size / median

    batches = pipeline.train_pipeline(train, args.batch_size, seed=0, repeat=True)
    model.fit(batches, epochs=1, steps_per_epoch=args.warmup, verbose=0)
    start = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=args.steps, verbose=0)
    fit = args.steps * args.batch_size / (time.perf_counter() - start)
    cost = 1 - fit / bare
    print(
        f"machine: {harness.machine()}; ResNet-{args.depth} width {args.width} NAM, batch "
        f"{args.batch_size}, {precision}, XLA {'on' if xla else 'off'}"
    )
    print(f"{'bare train step (in memory)':<34}{bare:9.1f} img/s")
    print(f"{'model.fit on augmented pipeline':<34}{fit:9.1f} img/s")
    print(f"pipeline cost: {cost:.1%} of the step time")
    harness.write_json(
        args.json,
        {
            "bare_images_per_s": bare,
            "fit_images_per_s": fit,
            "pipeline_cost": cost,
            "precision": precision,
            "xla": xla,
            "args": vars(args),
        },
    )


if __name__ == "__main__":
    main()
