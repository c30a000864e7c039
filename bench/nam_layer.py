"""Forward + backward time of one NAM layer on a stage-1 feature map, per implementation.

    python bench/nam_layer.py [--shape 64 32 32 256]

What the NAM overhead is made of on the CPU, and what was tried to cut it:
Keras' BatchNormalization alone, NAMAttention as shipped (its BN + the gate),
the same maths fused by hand in keras.ops (moments, one per-channel affine,
the gate), TensorFlow's fused batch-norm kernel + the gate (backend-specific),
and the hand-fused maths as an XLA cluster. One ReLU is the one-pass reference.
Every hand-written variant is first checked equal to `NAMAttention` (values
and gradients) by `harness.check_against_nam`; a mismatch stops the run.
"""

import harness
import keras
import numpy as np
import tensorflow as tf
from keras import ops

from nam_keras import NAMAttention
from nam_keras.layers.normalization import BN_EPSILON


def nam_in_ops(x, gamma, beta):
    """NAM with the BN and the weighting folded into one per-channel affine."""
    mean, var = ops.moments(x, axes=[0, 1, 2])
    inv = ops.rsqrt(var + BN_EPSILON)
    g = ops.abs(gamma)
    w = g / ops.sum(g)
    scale = w * gamma * inv
    shift = w * (beta - mean * gamma * inv)
    return x * ops.sigmoid(x * scale + shift)


def nam_tf_fused_bn(x, gamma, beta):
    """TensorFlow's fused batch-norm kernel, then the gate."""
    y = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=BN_EPSILON, is_training=True)[0]
    g = tf.abs(gamma)
    return tf.sigmoid(g / tf.reduce_sum(g) * y) * x


_nam_in_ops_xla = tf.function(nam_in_ops, jit_compile=True)


def nam_xla(x, gamma, beta):
    """`nam_in_ops` compiled by XLA into one cluster (TF variables passed in)."""
    return _nam_in_ops_xla(x, gamma.value, beta.value)


VARIANTS = {
    "hand-fused keras.ops": nam_in_ops,
    "TF fused batch-norm + gate": nam_tf_fused_bn,
    "hand-fused as an XLA cluster": nam_xla,
}


def time_forward_backward(fn, x, variables, steps, warmup):
    """Median seconds of one compiled forward + backward pass of `fn(x)`."""

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn(x))
        return tape.gradient(loss, [x, *variables])[0]

    median, _ = harness.timed(lambda: step().numpy(), steps, warmup)
    return median


def main(argv=None):
    p = harness.parser(__doc__, steps=10, warmup=1)
    p.add_argument("--shape", type=int, nargs=4, default=(64, 32, 32, 256))
    args = p.parse_args(argv)
    shape = tuple(args.shape)
    x = tf.constant(np.random.default_rng(0).normal(size=shape).astype("float32"))
    nam = NAMAttention()
    nam.build(shape)
    # a non-uniform gamma, so that the check sees the weighting at work
    nam.channel_bn.gamma.assign(np.random.default_rng(1).uniform(0.2, 2.0, shape[-1]))
    bn = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.9)
    bn.build(shape)
    gamma, beta = nam.channel_bn.gamma, nam.channel_bn.beta
    rows = {
        "one ReLU (1-pass reference)": time_forward_backward(
            tf.nn.relu, x, [], args.steps, args.warmup
        ),
        "Keras BatchNormalization": time_forward_backward(
            lambda t: bn(t, training=True), x, bn.trainable_variables, args.steps, args.warmup
        ),
        "NAMAttention as shipped": time_forward_backward(
            lambda t: nam(t, training=True), x, nam.trainable_variables, args.steps, args.warmup
        ),
    }
    for name, variant in VARIANTS.items():
        harness.check_against_nam(variant, nam, x)
        rows[name] = time_forward_backward(
            lambda t, v=variant: v(t, gamma, beta), x, [gamma, beta], args.steps, args.warmup
        )
    print(
        f"machine: {harness.machine()}; NAM input {shape} float32, forward + backward, "
        f"median of {args.steps}; every variant checked equal to NAMAttention first"
    )
    for name, seconds in rows.items():
        print(f"{name:<32}{seconds * 1e3:9.1f} ms")
    harness.write_json(args.json, {"shape": shape, "ms": {k: v * 1e3 for k, v in rows.items()}})
    return rows


if __name__ == "__main__":
    main()
