"""Device choices: precision policy, XLA, and the `tf.distribute` strategy."""

import contextlib
import json
import os
import threading
import time

from nam_keras.errors import ConfigError


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


def resolve_precision(precision, gpus):
    """The Keras dtype policy for `--precision`.

    `auto` -> mixed_bfloat16 on Ampere or newer GPUs, mixed_float16 on older
    GPUs; on CPUs mixed_bfloat16 where the CPU has AMX-BF16 (`cpu_prefers_bf16`),
    else float32 (the README's performance table has the figures).

    Args:
        precision: `"auto"` or a Keras dtype policy name.
        gpus: the visible GPUs (`tf.config.list_physical_devices("GPU")`).

    Returns:
        A dtype policy name.
    """
    if precision != "auto":
        return precision
    if gpus:
        import tensorflow as tf

        details = tf.config.experimental.get_device_details(gpus[0])
        major = (details.get("compute_capability") or (0, 0))[0]
        return "mixed_bfloat16" if major >= 8 else "mixed_float16"
    return "mixed_bfloat16" if cpu_prefers_bf16() else "float32"


def resolve_jit(jit_compile, gpus):
    """`auto` -> XLA on GPUs; off on CPUs (XLA made CPU training 1.5-3.5x
    slower, README performance table). Returns a bool."""
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
    deadline = time.monotonic() + timeout
    with _answering(workers[index]):
        while missing := unreachable_workers(workers, index):
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"worker(s) {', '.join(missing)} of TF_CONFIG did not start within "
                    f"{timeout:g} s; start train.py on every machine of the cluster "
                    "(--cluster-timeout sets the wait)."
                )
            time.sleep(0.2)
        time.sleep(1.0)  # the others see this one before it stops answering


def make_strategy(cpu_replicas=0, cluster_timeout=600.0):
    """The `tf.distribute` strategy for this process.

    `TF_CONFIG` naming more than one worker -> `MultiWorkerMirroredStrategy`
    (given up after `cluster_timeout` seconds without every worker, see
    `wait_for_workers`);
    several GPUs -> `MirroredStrategy`; `cpu_replicas` > 1 splits the CPU into
    that many logical devices and mirrors over them (tests the multi-device
    path without GPUs); otherwise the default one-device strategy.
    """
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
    if name.startswith("_Default"):
        return "one device"
    return {"CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy"}.get(name, name)


def device_summary(gpus):
    """`"2 GPU(s)"` or `"CPU (N cores)"`."""
    if gpus:
        return f"{len(gpus)} GPU(s)"
    return f"CPU ({os.cpu_count()} cores)"
