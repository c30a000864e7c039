"""Training pieces: the PyTorch-style SGD, the warmup-cosine callback, device
choices (precision, XLA, distribution strategy) and run-directory helpers."""

import contextlib
import json
import math
import os
import tempfile

import keras
import numpy as np
from keras import ops


# --------------------------------------------------------------------------- optimizer


@keras.saving.register_keras_serializable(package="nam_keras")
class TorchSGD(keras.optimizers.Optimizer):
    """SGD with momentum and weight decay exactly as PyTorch/Paddle apply them.

    For every trainable variable `w` with gradient `g`:

        g = g + l2 * w                 # weight decay *added to the gradient*
        buf = momentum * buf + g
        w = w - lr * buf

    This is PyTorch's `SGD(momentum=0.9, weight_decay=5e-4)` and Paddle's
    `Momentum(weight_decay=5e-4)`. It differs from `keras.optimizers.SGD`,
    whose `weight_decay=` is decoupled (applied to the weights, not the
    gradient) and whose velocity absorbs the learning rate (so a changing
    learning rate acts differently).

    Args:
        learning_rate: float; a callback (`WarmupCosine`) may set it every step.
        momentum: momentum factor in [0, 1). Defaults to 0.9.
        l2: the coupled weight decay (PyTorch's `weight_decay`). Defaults to 5e-4.
        **kwargs: base optimizer arguments (`name`, `clipnorm`, ...); the base
            class' decoupled `weight_decay` is refused to avoid mixing them up.
    """

    def __init__(self, learning_rate=0.1, momentum=0.9, l2=5e-4, name="torch_sgd", **kwargs):
        if kwargs.get("weight_decay"):
            raise ValueError(
                "TorchSGD applies weight decay to the gradient through `l2=`; "
                f"received the decoupled weight_decay={kwargs['weight_decay']!r}."
            )
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1); received {momentum!r}.")
        if not float(l2) >= 0.0:
            raise ValueError(f"`l2` must be >= 0; received {l2!r}.")
        self.momentum = float(momentum)
        self.l2 = float(l2)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        if self.l2:
            g = ops.add(g, ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        buf = self.momentums[self._get_variable_index(variable)]
        self.assign(buf, ops.add(ops.multiply(buf, ops.cast(self.momentum, variable.dtype)), g))
        self.assign_sub(variable, ops.multiply(lr, buf))

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "l2": self.l2})
        config.pop("weight_decay", None)
        return config


# --------------------------------------------------------------------------- schedule


def warmup_cosine(step, base_lr, warmup_steps, total_steps):
    """Learning rate at optimizer step `step` (0-based).

    Linear warmup from 0 over `warmup_steps` steps, then cosine decay from
    `base_lr` to exactly 0 at the last step (`total_steps - 1`).
    """
    step = min(max(int(step), 0), total_steps - 1)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return 0.0
    progress = (step - warmup_steps) / decay_steps
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


@keras.saving.register_keras_serializable(package="nam_keras")
class WarmupCosine(keras.callbacks.Callback):
    """Sets the optimizer's learning rate before every training step.

    The rate is computed from the optimizer's own iteration count, so it is
    exact after `BackupAndRestore` (or any reload of the optimizer state)
    resumes a run. The value is added to the epoch logs as `lr`, so that
    `History`, `CSVLogger` and `TensorBoard` placed after this callback record it.

    Args:
        base_lr: peak learning rate, reached at the end of the warmup.
        total_steps: number of optimizer steps of the whole run.
        warmup_steps: length of the linear warmup from 0. Defaults to 2000.
    """

    def __init__(self, base_lr, total_steps, warmup_steps=2000):
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1; received {total_steps}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; received {warmup_steps}.")
        if base_lr < 0:
            raise ValueError(f"base_lr must be >= 0; received {base_lr}.")
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def lr_at(self, step):
        return warmup_cosine(step, self.base_lr, self.warmup_steps, self.total_steps)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self.model.optimizer.learning_rate = self.lr_at(step)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def get_config(self):
        return {"base_lr": self.base_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class ConfigError(ValueError):
    """A run was asked for something that cannot work (bad paths, sizes, resume)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises `NonFiniteLossError` as soon as the loss is not finite.

    Unlike `keras.callbacks.TerminateOnNaN`, which lets the epoch end (so a
    `BackupAndRestore` placed after it saves the broken weights), raising ends
    `fit` at once: the last good backup stays on disk.
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"the training loss became {float(loss)} at step {batch} of epoch "
                f"{self._epoch + 1}; training stopped. The last completed epoch "
                "is kept in the run directory's backup."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


# --------------------------------------------------------------------------- devices


def _cpu_supports_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision, gpus):
    """`auto` -> mixed_bfloat16 on Ampere+ GPUs, mixed_float16 on older GPUs;
    on CPUs mixed_bfloat16 where the CPU has bf16 instructions (measured 1.7x
    faster than float32 on our 2-core machine), else float32."""
    if precision != "auto":
        return precision
    if gpus:
        import tensorflow as tf

        details = tf.config.experimental.get_device_details(gpus[0])
        major = (details.get("compute_capability") or (0, 0))[0]
        return "mixed_bfloat16" if major >= 8 else "mixed_float16"
    return "mixed_bfloat16" if _cpu_supports_bf16() else "float32"


def resolve_jit(jit_compile, gpus):
    """`auto` -> XLA on GPUs; off on CPUs (XLA made CPU training 1.7x slower)."""
    if jit_compile == "auto":
        return bool(gpus)
    return jit_compile == "on"


def _patch_multi_worker_reduce(strategy):
    """Makes `keras.Model.fit` (Keras 3.15) work under MultiWorkerMirroredStrategy.

    Two Keras calls of `strategy.reduce` fail with this strategy (TensorFlow
    issue 72388): `fit` reduces the first (images, labels) batch, a nested
    structure, to build the model ("Attempt to convert a value
    (PerReplica...)"), and every step reduces the scalar metric values with
    `axis=0` ("Invalid reduction dimension 0 for input with 0 dimensions").
    This reduces nested structures leaf by leaf and scalars across replicas
    only; everything else goes through unchanged.
    """
    import tensorflow as tf

    reduce = strategy.reduce

    def leaf(reduce_op, value, axis):
        if axis is not None:
            local = strategy.experimental_local_results(value)
            if local and getattr(local[0], "shape", None) is not None and local[0].shape.rank == 0:
                axis = None
        return reduce(reduce_op, value, axis)

    def patched(reduce_op, value, axis=None):
        return tf.nest.map_structure(lambda v: leaf(reduce_op, v, axis), value)

    strategy.reduce = patched
    return strategy


def make_strategy(cpu_replicas=0):
    """The `tf.distribute` strategy for this process.

    `TF_CONFIG` naming more than one worker -> `MultiWorkerMirroredStrategy`;
    several GPUs -> `MirroredStrategy`; `cpu_replicas` > 1 splits the CPU into
    that many logical devices and mirrors over them (tests the multi-device
    path without GPUs); otherwise the default one-device strategy.
    """
    import tensorflow as tf

    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    workers = tf_config.get("cluster", {}).get("worker", [])
    if len(workers) + len(tf_config.get("cluster", {}).get("chief", [])) > 1:
        return _patch_multi_worker_reduce(tf.distribute.MultiWorkerMirroredStrategy())
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
        )
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary path next to `path`; renames it to `path` when the
    block succeeds and removes it otherwise, so `path` is always either the
    old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    """Writes `text` to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_model_atomic(model, path):
    """`model.save(path)` through a temporary `.keras` file and a rename."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def check_writable(path):
    """Raises `ConfigError` unless a file can be created next to `path`."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ConfigError(f"output path {path!r} is a folder; expected a .keras file path.")
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {path!r}: folder {folder!r} does not exist.")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        os.close(fd)
        os.remove(tmp)
    except OSError as err:
        raise ConfigError(f"cannot write {path!r}: {err.strerror}.") from None
