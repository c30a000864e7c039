"""Images/s of the training input pipeline (default augmentation), per CPU core.

    python bench/pipeline.py [--batch-size 128] [--steps 200] [--json out.json]

Iterates `nam_keras.data.train_pipeline` on synthetic CIFAR-shaped data (the
same in-memory path as the real data) after a warm-up, and reports images/s in
total and divided by the number of CPU cores TensorFlow may use.
"""

import os
import time

import harness

from nam_keras.data import pipeline


def main(argv=None):
    parser = harness.parser(__doc__, steps=200, warmup=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=50_000)
    args = parser.parse_args(argv)

    train, _ = pipeline.load_cifar100("synthetic", synthetic_sizes=(args.train_size, 16))
    it = iter(pipeline.train_pipeline(train, args.batch_size, seed=0, repeat=True))
    for _ in range(args.warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(args.steps):
        images, _ = next(it)
    images.numpy()
    seconds = time.perf_counter() - start
    cores = len(os.sched_getaffinity(0))
    ips = args.steps * args.batch_size / seconds
    result = {
        "images_per_s": round(ips),
        "cores": cores,
        "images_per_s_per_core": round(ips / cores),
        "batch_size": args.batch_size,
        "steps": args.steps,
    }
    print(f"{'pipeline':<12}{'img/s':>10}{'cores':>7}{'img/s/core':>12}")
    print(f"{'augmented':<12}{ips:>10.0f}{cores:>7}{ips / cores:>12.0f}")
    harness.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
