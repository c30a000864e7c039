"""Forward + backward time of one NAM layer on a stage-1 feature map, per implementation.

    python bench/nam_layer.py [--shape 64 32 32 256]

What the NAM overhead is made of on the CPU, and what was tried to cut it:
Keras' BatchNormalization alone, NAMAttention as shipped (its BN + the gate),
the same maths fused by hand in keras.ops (moments, one per-channel affine,
the gate), TensorFlow's fused batch-norm kernel + the gate (backend-specific),
and the hand-fused maths as an XLA cluster. One ReLU is the one-pass reference.
"""
import argparse
import common  # noqa: F401
import statistics
import time
import numpy as np, tensorflow as tf, keras
from keras import ops
from nam_keras import NAMAttention

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--shape", type=int, nargs=4, default=(64, 32, 32, 256))
shape = tuple(parser.parse_args().shape)
print(f"machine: {common.machine()}; NAM input {shape} float32, forward + backward, median of 10")
x = tf.constant(np.random.default_rng(0).normal(size=shape).astype("float32"))

def bench(name, fwd, variables):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = fwd(x)
            loss = tf.reduce_sum(out)
        g = tape.gradient(loss, [x] + variables)
        return g[0]
    step()
    ts=[]
    for _ in range(10):
        t=time.perf_counter(); step().numpy(); ts.append(time.perf_counter()-t)
    print(f"{name:<30} {statistics.median(ts)*1000:8.1f} ms")

bn = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9); bn.build(shape)
bench("keras BN", lambda x: bn(x, training=True), bn.trainable_variables)
relu_only = lambda x: tf.nn.relu(x)
bench("relu (1 pass ref)", relu_only, [])
nam = NAMAttention(); nam.build(shape)
bench("NAM current", lambda x: nam(x, training=True), nam.trainable_variables)

g = tf.Variable(tf.ones(shape[-1])); b = tf.Variable(tf.zeros(shape[-1]))
def fused(x):
    mean, var = ops.moments(x, axes=[0,1,2])
    inv = ops.rsqrt(var + 1e-5)
    ag = ops.abs(g); w = ag / ops.sum(ag)
    a = w * g * inv
    c = w * (b - mean * g * inv)
    return x * ops.sigmoid(x * a + c)
bench("fused ops", fused, [g, b])

def fused_bn(x):
    y, m, v = tf.compat.v1.nn.fused_batch_norm(x, g, b, epsilon=1e-5, is_training=True)[:3]
    ag = tf.abs(g); w = ag / tf.reduce_sum(ag)
    return tf.sigmoid(w * y) * x
bench("tf fused_batch_norm + gate", fused_bn, [g, b])

@tf.function(jit_compile=True)
def xla_gate(x, g, b):
    mean, var = tf.nn.moments(x, axes=[0,1,2])
    inv = tf.math.rsqrt(var + 1e-5)
    ag = tf.abs(g); w = ag / tf.reduce_sum(ag)
    a = w * g * inv; c = w * (b - mean * g * inv)
    return x * tf.sigmoid(x * a + c)
bench("XLA cluster fused", lambda x: xla_gate(x, g, b), [g, b])
