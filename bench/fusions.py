"""Which kernels TensorFlow actually runs for one training step, after its graph optimisations.

    python bench/fusions.py                       # ResNet-18 width 16, both precisions
    python bench/fusions.py --precisions mixed_bfloat16 --attention nam

Runs one compiled `model.train_function` step with TensorFlow's run metadata
on and counts the op types of the graph as optimised for execution (grappler
remapper and the oneDNN rewrites included): fused batch norm kernels, fused
convolutions, unfused moments, casts. Compares the BN of this project
(`FusedBatchNormalization`) with Keras' own (`--keras-bn` swaps it in).
"""

import collections

import harness
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context

import nam_keras.layers.normalization as normalization

#: op types worth counting (substring match, oneDNN names included)
WATCH = (
    "FusedBatchNorm",
    "FusedConv2D",
    "Conv2D",
    "Mean",
    "SquaredDifference",
    "Cast",
    "Sigmoid",
    "Relu",
)


def optimised_op_counts(precision, attention, keras_bn, depth, width, batch):
    """Op-type counts of the executed (optimised) graphs of one training step."""
    # keras_bn: Keras' path in every BN, the reference the fused BN replaces
    with normalization.fused_kernels(not keras_bn):
        model = harness.compiled_resnet(depth, width, precision, False, attention)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 100, (batch,)).astype("int32"))
    step = harness.train_step_fn(model, x, y)
    context.enable_run_metadata()
    try:
        step()
        metadata = context.export_run_metadata()
    finally:
        context.disable_run_metadata()
    counts = collections.Counter()
    for function_graphs in metadata.function_graphs:
        for graph in function_graphs.partition_graphs:
            counts.update(node.op for node in graph.node)
    return counts


def summarise(counts):
    """{watched name: total count of op types containing it}."""
    return {w: sum(n for op, n in counts.items() if w in op) for w in WATCH}


def main(argv=None):
    p = harness.add_model_arguments(harness.parser(__doc__, steps=1, warmup=0), batch_size=8)
    p.set_defaults(depth=18, width=16)
    p.add_argument("--precisions", default="float32,mixed_bfloat16")
    p.add_argument("--attention", default="nam", help="nam or none")
    args = p.parse_args(argv)
    attention = None if args.attention == "none" else args.attention
    rows = {}
    for precision in args.precisions.split(","):
        for keras_bn in (True, False):
            counts = optimised_op_counts(
                precision, attention, keras_bn, args.depth, args.width, args.batch_size
            )
            label = f"{precision}, {'Keras BN' if keras_bn else 'FusedBatchNormalization'}"
            rows[label] = {
                "watched": summarise(counts),
                "fused_ops": sorted(op for op in counts if "Fused" in op or op.startswith("_Mkl")),
            }
    print(
        f"machine: {harness.machine()}; ResNet-{args.depth} width {args.width} "
        f"attention {args.attention}; op types executed in one training step"
    )
    print(f"{'configuration':<42}" + "".join(f"{w:>18}" for w in WATCH))
    for label, row in rows.items():
        print(f"{label:<42}" + "".join(f"{row['watched'][w]:>18}" for w in WATCH))
    for label, row in rows.items():
        print(f"{label}: fused/oneDNN op types {', '.join(row['fused_ops']) or 'none'}")
    harness.write_json(args.json, {"args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
