"""Device choices: the accelerators of the Keras backend, precision policy,
XLA, the input path, and the strategy over several devices: `tf.distribute`
on TensorFlow, `keras.distribution.DataParallel` on JAX."""

import contextlib
import json
import logging
import os
import threading
import time

import keras

from nam_keras.errors import ConfigError

logger = logging.getLogger("nam_keras")

#: seconds between the "still waiting" lines of `wait_for_workers`
WAIT_LOG_INTERVAL = 10.0


def backend():
    """The Keras backend: `"tensorflow"`, `"jax"` or `"torch"`."""
    return keras.backend.backend()


def accelerators():
    """The GPUs the Keras backend sees, as `(name, compute capability major)` pairs."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        details = [tf.config.experimental.get_device_details(g) for g in gpus]
        return [(g.name, (d.get("compute_capability") or (0, 0))[0]) for g, d in zip(gpus, details)]
    if name == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return [
            (str(d), int(str(getattr(d, "compute_capability", "0")).split(".")[0])) for d in gpus
        ]
    if name == "torch":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [(f"cuda:{i}", torch.cuda.get_device_capability(i)[0]) for i in range(count)]
    return []


class OneDevice:
    """The "strategy" of one device on JAX and PyTorch: no replicas."""

    num_replicas_in_sync = 1

    def scope(self):
        """A context that changes nothing."""
        return contextlib.nullcontext()


class JaxDataParallel:
    """The "strategy" of several devices on JAX: `keras.distribution.DataParallel`.

    Inside `scope()` the variables are created replicated on every device and
    `model.fit` splits each batch (the global batch) along its first axis over
    them; the step is compiled once for the global batch (GSPMD), so a mean
    over the batch, the loss's and BatchNormalization's statistics included,
    is over the global batch, as on one device.
    """

    def __init__(self, devices):
        devices = list(devices)
        self.distribution = keras.distribution.DataParallel(devices=devices)
        self.num_replicas_in_sync = len(devices)

    def scope(self):
        """The distribution's scope: variables and `fit` under it are distributed."""
        return self.distribution.scope()


def start_devices(cpu_replicas=0, cluster_timeout=600.0):
    """Sets up JAX's devices before their first use (nothing on the other
    backends): `cpu_replicas` CPU devices when it is above 1, and several hosts
    when `JAX_COORDINATOR_ADDRESS` is set (`join_jax_cluster`). Calling it
    again with the same arguments changes nothing."""
    if backend() != "jax":
        return
    import jax

    if cpu_replicas > 1 and jax.config.jax_num_cpu_devices != cpu_replicas:
        try:
            jax.config.update("jax_num_cpu_devices", cpu_replicas)
        except RuntimeError as err:  # JAX's devices are already in use in this process
            if len(jax.devices("cpu")) != cpu_replicas:  # e.g. not set by XLA_FLAGS either
                raise ConfigError(
                    f"--cpu-replicas {cpu_replicas}: JAX's CPU devices were set up before "
                    f"train started ({err}); set XLA_FLAGS=--xla_force_host_platform_device_"
                    f"count={cpu_replicas} before Python starts instead."
                ) from None
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and not jax.distributed.is_initialized():
        join_jax_cluster(address, cluster_timeout)


def join_jax_cluster(address, timeout):
    """`jax.distributed.initialize` at the coordinator `address`, with
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` where they are set (else JAX
    reads them from the cluster: SLURM, Open MPI, ...); `ConfigError` after
    `timeout` s without every process, or on malformed settings."""
    import jax

    names = {"JAX_NUM_PROCESSES": "num_processes", "JAX_PROCESS_ID": "process_id"}
    try:
        given = {key: int(os.environ[name]) for name, key in names.items() if name in os.environ}
    except ValueError as err:
        raise ConfigError(
            f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers (the number of hosts, this "
            f"host's index from 0); {err}."
        ) from None
    logger.info(f"joining the JAX cluster at {address} (--cluster-timeout {timeout:g} s)")
    try:
        jax.distributed.initialize(address, initialization_timeout=int(timeout), **given)
    except (RuntimeError, ValueError) as err:  # XlaRuntimeError is a RuntimeError
        raise ConfigError(
            f"the JAX cluster at JAX_COORDINATOR_ADDRESS={address} did not start "
            f"({type(err).__name__}: {err}); start train.py on every host with the same "
            "address, JAX_NUM_PROCESSES and its own JAX_PROCESS_ID (--cluster-timeout sets the "
            "wait)."
        ) from None


def jax_strategy(cpu_replicas=0, cluster_timeout=600.0):
    """`JaxDataParallel` over every device JAX has (the accelerators, or the
    CPU devices; all hosts'), or over `cpu_replicas` CPU devices when it is
    above 1 (as `tf.distribute`'s logical CPUs); `OneDevice` for one device."""
    start_devices(cpu_replicas, cluster_timeout)
    devices = keras.distribution.list_devices("cpu" if cpu_replicas > 1 else None)
    return JaxDataParallel(devices) if len(devices) > 1 else OneDevice()


def fit_scope(strategy):
    """The context `model.fit` runs in: `keras.distribution`'s scope for
    `JaxDataParallel` (JAX reads the distribution when it compiles the step and
    splits the batches); nothing for `tf.distribute`, whose models carry their
    strategy, and for one device."""
    if isinstance(strategy, JaxDataParallel):
        return strategy.scope()
    return contextlib.nullcontext()


def tensorflow_installed():
    """Whether TensorFlow is installed (a JAX-only machine has none); found
    without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec("tensorflow") is not None
    except ImportError:
        return False


def resolve_input(choice, randaugment=False, replicas=1, xla_mixing=False):
    """`--input` as `("host" or "device", why)`, `why` a phrase for the log.

    `auto`: the host's `tf.data` pipeline where TensorFlow is installed, the
    device-side input where it is not. `ConfigError` for what cannot work: the
    host input without TensorFlow; on the device, RandAugment (it draws from
    its own state), `tf.distribute` with several replicas (each would draw the
    same augmentation for its part of the batch) and MixUp/CutMix in a
    TensorFlow XLA step (`xla_mixing`: TensorFlow has no XLA kernel for their
    Beta draws).
    """
    have_tf = tensorflow_installed()
    reason = ""
    if choice == "auto":
        choice, reason = ("host", "") if have_tf else ("device", " (TensorFlow is not installed)")
    if choice == "host" and not have_tf:
        raise ConfigError(
            "--input host makes batches with tf.data, and TensorFlow is not installed: use "
            "--input device (or auto), which needs no TensorFlow, or install tensorflow."
        )
    if choice == "host":
        return choice, reason
    tensorflow = backend() == "tensorflow"
    problems = [
        (
            "--randaugment has no device-side form (keras.layers.RandAugment draws from its own "
            "state, not from the step)",
            randaugment,
        ),
        (
            f"tf.distribute over {replicas} replicas would draw the same augmentation for each "
            "replica's part of the batch",
            tensorflow and replicas > 1,
        ),
        (
            "TensorFlow's XLA has no kernel for the Beta draws of --mixup/--cutmix",
            tensorflow and xla_mixing,
        ),
    ]
    problem = next((text for text, on in problems if on), None)
    if problem:
        raise ConfigError(
            f"{problem}, and the input is made on the device{reason or ' (--input device)'}: "
            "use --input host (with TensorFlow installed), or KERAS_BACKEND=jax, or drop the "
            "option."
        )
    return choice, reason


def process_of():
    """`(index, count)` of this process among the hosts of a run (`(0, 1)` on one host)."""
    if backend() != "jax":
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def check_backend_supports(cpu_replicas=0, sync_bn=None, tf_config=None):
    """`ConfigError` when a feature is asked for under a backend that lacks it.

    Several devices exist on TensorFlow (`tf.distribute`: several GPUs,
    `--cpu-replicas`, `TF_CONFIG` clusters, `--sync-bn`) and on JAX
    (`keras.distribution.DataParallel`: all local devices, `--cpu-replicas`,
    several hosts through `jax.distributed`; BN statistics are those of the
    global batch, so `--no-sync-bn` is refused there). PyTorch trains on one.
    """
    name = backend()
    if name == "tensorflow":
        return
    workers, _ = read_tf_config(tf_config)
    cluster = (f"TF_CONFIG with {len(workers)} workers", len(workers) > 1)
    if name == "jax":
        asked = [what for what, on in (("--no-sync-bn", sync_bn is False), cluster) if on]
        if asked:
            raise ConfigError(
                f"{', '.join(asked)} needs tf.distribute, which only the TensorFlow backend "
                "has; on JAX train.py trains over all local devices with "
                "keras.distribution.DataParallel, BN statistics over the global batch, and "
                "over several hosts through jax.distributed (JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES, JAX_PROCESS_ID). Run with KERAS_BACKEND=tensorflow, or "
                "drop the option."
            )
        return
    options = ((f"--cpu-replicas {cpu_replicas}", cpu_replicas > 1), ("--sync-bn", bool(sync_bn)))
    asked = [what for what, on in (*options, cluster) if on]
    if asked:
        raise ConfigError(
            f"{', '.join(asked)} needs several devices, which train.py has on TensorFlow "
            f"(tf.distribute) and JAX (keras.distribution); KERAS_BACKEND is {name!r}, which "
            "trains on one device. Run with KERAS_BACKEND=jax or tensorflow, or drop the option."
        )


def cpu_prefers_bf16(cpuinfo=None):
    """True where bfloat16 training beats float32 on this CPU: AMX-BF16 (Intel
    Sapphire Rapids and newer). AVX512-BF16 alone is not enough: on such an
    AMD EPYC, bf16 trained the NAM ResNet-50 no faster than float32 (README
    performance table), and bf16 costs precision.

    Args:
        cpuinfo: the text of `/proc/cpuinfo`; read from the machine when `None`.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return "amx_bf16" in flags


def resolve_precision(precision, gpus, backend_name="tensorflow"):
    """The Keras dtype policy for `--precision`.

    `auto` -> mixed_bfloat16 on Ampere or newer GPUs, mixed_float16 on older
    GPUs; on CPUs, with TensorFlow, mixed_bfloat16 where the CPU has AMX-BF16
    (`cpu_prefers_bf16`; the README's performance table has the figures),
    else float32 (JAX and PyTorch CPU training were not measured: float32).

    Args:
        precision: `"auto"` or a Keras dtype policy name.
        gpus: `accelerators()`: `(name, compute capability major)` pairs.
        backend_name: the Keras backend.

    Returns:
        A dtype policy name.
    """
    if precision != "auto":
        return precision
    if gpus:
        return "mixed_bfloat16" if gpus[0][1] >= 8 else "mixed_float16"
    if backend_name == "tensorflow" and cpu_prefers_bf16():
        return "mixed_bfloat16"
    return "float32"


def resolve_jit(jit_compile, gpus, backend_name="tensorflow"):
    """`--jit-compile` as a bool. `auto`: on TensorFlow, XLA on GPUs and off
    on CPUs (XLA made CPU training 1.5-3.5x slower, README performance
    table); on JAX always (JAX without `jit` runs op by op); on PyTorch off
    (`torch.compile`, Keras' default there)."""
    if jit_compile != "auto":
        return jit_compile == "on"
    return {"tensorflow": bool(gpus), "jax": True}.get(backend_name, False)


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


def read_tf_config(text):
    """The cluster of `TF_CONFIG` as `(workers, this worker's index)`; `ConfigError`
    naming what is wrong when it is malformed."""
    try:
        tf_config = json.loads(text or "{}")
        cluster = tf_config.get("cluster", {})
        workers = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
        task = tf_config.get("task", {})
        index = int(task.get("index", 0)) + (
            1 if task.get("type") == "worker" and cluster.get("chief") else 0
        )
        if not all(isinstance(w, str) and ":" in w for w in workers):
            raise ValueError("every worker must be a 'host:port' string")
    except (ValueError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"TF_CONFIG is malformed ({err}); expected e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}.'
        ) from None
    if len(workers) > 1 and not 0 <= index < len(workers):
        raise ConfigError(
            f"TF_CONFIG: task index {index} is not one of the {len(workers)} workers."
        )
    return workers, index


def unreachable_workers(workers, index):
    """The other workers' addresses that do not accept a TCP connection now."""
    import socket

    missing = []
    for i, worker in enumerate(workers):
        if i == index:
            continue
        host, port = worker.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
        except (OSError, ValueError):
            missing.append(worker)
    return missing


@contextlib.contextmanager
def _answering(address):
    """Accepts (and drops) connections on this worker's own port meanwhile, so
    that the others can see it is up before TensorFlow's server owns the port."""
    import socket

    port = int(address.rsplit(":", 1)[1])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
        listener.listen(16)
    except OSError:  # taken: the others will find it when TensorFlow's server is up
        listener.close()
        yield
        return
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, name="cluster-rendezvous", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        listener.close()


def wait_for_workers(workers, index, timeout):
    """Waits until every other worker of `TF_CONFIG` is up, in Python.

    `MultiWorkerMirroredStrategy` waits for missing workers in C++, silently,
    for up to an hour, and deaf to SIGTERM; waiting here first keeps SIGTERM
    and Ctrl-C working and fails after `timeout` s naming the missing workers.
    Each worker answers on its own port meanwhile, so the workers find each
    other before any of them starts TensorFlow's server.
    """
    start = time.monotonic()
    deadline = start + timeout
    next_log = None
    with _answering(workers[index]):
        while missing := unreachable_workers(workers, index):
            now = time.monotonic()
            if now > deadline:
                raise ConfigError(
                    f"worker(s) {', '.join(missing)} of TF_CONFIG did not start within "
                    f"{timeout:g} s; start train.py on every machine of the cluster "
                    "(--cluster-timeout sets the wait)."
                )
            if next_log is None:
                logger.info(
                    f"waiting for worker(s) {', '.join(missing)} of TF_CONFIG (this is worker "
                    f"{index} of {len(workers)}; giving up after --cluster-timeout {timeout:g} s)"
                )
                next_log = now + WAIT_LOG_INTERVAL
            elif now >= next_log:
                logger.info(
                    f"still waiting for worker(s) {', '.join(missing)} of TF_CONFIG: "
                    f"{now - start:.0f} s of --cluster-timeout {timeout:g} s"
                )
                next_log = now + WAIT_LOG_INTERVAL
            time.sleep(0.2)
        if next_log is not None:
            logger.info(f"all {len(workers)} workers of TF_CONFIG are up")
        time.sleep(1.0)  # the others see this one before it stops answering


def make_strategy(cpu_replicas=0, cluster_timeout=600.0):
    """The `tf.distribute` strategy for this process.

    `TF_CONFIG` naming more than one worker -> `MultiWorkerMirroredStrategy`
    (given up after `cluster_timeout` seconds without every worker, see
    `wait_for_workers`);
    several GPUs -> `MirroredStrategy`; `cpu_replicas` > 1 splits the CPU into
    that many logical devices and mirrors over them (tests the multi-device
    path without GPUs); otherwise the default one-device strategy. Under
    JAX: `jax_strategy`; under PyTorch: `OneDevice` (see `check_backend_supports`).
    """
    check_backend_supports(cpu_replicas, tf_config=os.environ.get("TF_CONFIG"))
    if backend() == "jax":
        return jax_strategy(cpu_replicas, cluster_timeout)
    if backend() != "tensorflow":
        return OneDevice()
    import tensorflow as tf

    workers, index = read_tf_config(os.environ.get("TF_CONFIG"))
    if len(workers) > 1:
        wait_for_workers(workers, index, cluster_timeout)
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


def strategy_name(strategy):
    """A readable name: "one device", "MirroredStrategy", ..."""
    name = type(strategy).__name__
    if name.startswith("_Default") or name == "OneDevice":
        return "one device"
    if isinstance(strategy, JaxDataParallel):
        return "keras.distribution.DataParallel"
    return {"CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy"}.get(name, name)


def device_summary(gpus):
    """`"2 GPU(s) (Keras backend jax)"` or `"CPU (N cores) (Keras backend tensorflow)"`."""
    where = f"{len(gpus)} GPU(s)" if gpus else f"CPU ({os.cpu_count()} cores)"
    return f"{where}, Keras backend {backend()}"
