"""The training step TensorFlow compiles with XLA, and XLA's cost analysis of it.

`bench/xla_cost.py` under `KERAS_BACKEND=tensorflow` uses these: TensorFlow
gives the HLO of a `jit_compile=True` step (the form Keras' `jit_compile="auto"`
takes on a GPU), and jaxlib's XLA compiles it for the CPU, whose
`cost_analysis()` gives the FLOPs and bytes accessed, as for JAX's own step.
Needs TensorFlow and JAX; nothing runs and nothing is timed.
"""

import keras


def tensorflow_train_step(model, optimizer):
    """A `tf.function(jit_compile=True)` `(x, y) -> loss`: forward in training
    mode, the loss with the layers' penalties, the gradients and the optimizer's
    update of the trainable variables (moving statistics updated too), as
    bench/gpu.py's `keras_train_step` does on JAX."""
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables

    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits) + sum(model.losses)
            scaled = optimizer.scale_loss(loss)
        optimizer.apply(tape.gradient(scaled, variables), variables)
        return loss

    return tf.function(step, jit_compile=True)


def hlo_cost_analysis(function, *args):
    """`cost_analysis()` of `function(*args)` (a `jit_compile=True`
    `tf.function`) as XLA compiles TensorFlow's HLO of it for the CPU with
    jaxlib (TensorFlow itself does not expose the figures)."""
    from jax._src import compiler, xla_bridge
    from jax._src.interpreters import mlir
    from jax._src.lib import xla_client
    from jax._src.lib.mlir import ir

    proto = function.experimental_get_compiler_ir(*args)(stage="hlo_serialized")
    text = xla_client._xla.mlir.hlo_to_stablehlo(proto)
    backend = xla_bridge.get_backend("cpu")
    options = compiler.get_compile_options(num_replicas=1, num_partitions=1)
    devices = xla_client.DeviceList(tuple(backend.devices()[:1]))
    with mlir.make_ir_context():
        module = ir.Module.parse(text)
        executable = compiler.backend_compile_and_load(backend, module, devices, options, [])
    return executable.cost_analysis()


def step_cost_analysis(model, optimizer, batch, size):
    """The cost analysis of `tensorflow_train_step` for a batch of `batch`
    `size` x `size` RGB images and integer labels."""
    import tensorflow as tf

    x = tf.zeros((batch, size, size, 3), "float32")
    y = tf.zeros((batch,), "int32")
    return hlo_cost_analysis(tensorflow_train_step(model, optimizer), x, y)
