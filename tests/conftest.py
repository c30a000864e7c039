"""Shared fixtures: float32 policy and seeds for every test, tiny training
runs, CIFAR-100 archives in the real format, and a trained tiny model."""

import io
import os
import pickle
import subprocess
import sys
import tarfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX compiles every new shape (a ResNet's initialisers included) with XLA: a
# compilation cache shared by this run's processes (the JAX run of the suite and
# the child processes of tests/test_backends.py) compiles each once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tiny test networks: XLA's compile time, not its code's speed, is what costs (-25% on
# the JAX run of the model-side tests with a cold cache). Child processes inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The flags of a tiny, seconds-long train.py run (add --epochs etc.).
TINY = "--dataset synthetic --synthetic-size 64 16 --depth 18 --width 4 --batch-size 8".split()
TINY += ["--precision", "float32", "--verbose", "2"]


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.tensorflow_only` tests (TensorFlow's kernels, tapes, graphs)
    are skipped when the suite runs under another Keras backend, and so are the
    `backend_independent` ones (full-size parameter counts: slow to build on JAX,
    and the same everywhere)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"TensorFlow-only; KERAS_BACKEND={backend}")
    once = pytest.mark.skip(reason="the same on every backend: checked once, on TensorFlow")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)
        elif "backend_independent" in item.keywords:
            item.add_marker(once)


@pytest.fixture(autouse=True)
def _float32_policy_and_seed():
    """Every test starts from the float32 policy and fixed seeds."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def tiny_args(tmp_path):
    """`tiny_args(*extra, name="run")`: TINY flags writing into `tmp_path`."""

    def make(*extra, name="run"):
        return [
            *TINY,
            "--run-dir",
            str(tmp_path / name),
            "--output",
            str(tmp_path / f"{name}.keras"),
            *extra,
        ]

    return make


@pytest.fixture
def no_tensorflow():
    """Python code (a string) that makes `import tensorflow` fail in the child
    process that runs it first, as on a machine without TensorFlow."""
    return """
import sys
class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoTensorFlow())
"""


@pytest.fixture
def run_script():
    """`run_script("train.py", args, env=None)`: a child Python process
    running one of the top-level scripts, stdout and stderr merged."""

    def start(script, args, env=None, **kwargs):
        return subprocess.Popen(
            [sys.executable, os.path.join(ROOT, script), *args],
            cwd=ROOT,
            env={
                k: v
                for k, v in {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}.items()
                if v is not None  # env={"NAME": None} unsets NAME
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kwargs,
        )

    return start


@pytest.fixture
def interrupt_when(run_script):
    """`interrupt_when(args, path, signum, env=None)`: starts train.py with `args`
    (and `env` added to the environment), sends `signum` as soon as `path`
    exists; returns `(exit code, output)`."""

    def run(args, path, signum, env=None):
        proc = run_script("train.py", args, env=env)
        deadline = time.monotonic() + 120
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
        return proc.returncode, out

    return run


def forward_backward(fn, x, variables, xla=False):
    """`[fn(x), d loss/dx, d loss/d variables...]` as float32 NumPy arrays, for a
    loss that is not a plain sum (so the incoming gradient varies). TensorFlow
    (a tape; in a `jit_compile=True` function where `xla`) or JAX (`jax.grad` of
    a stateless call: the variables' updates, such as moving statistics, are not
    applied)."""

    def loss_of(out):
        out32 = keras.ops.cast(out, "float32")
        return keras.ops.sum(out32 * keras.ops.cos(out32))

    as_np = lambda t: np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float32")))
    if keras.backend.backend() == "jax":
        import jax

        def f(values, x):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                out = fn(x)
            return loss_of(out), out

        grad = jax.grad(f, argnums=(0, 1), has_aux=True)
        (d_values, d_x), out = grad([v.value for v in variables], keras.ops.convert_to_tensor(x))
        return [as_np(t) for t in (out, d_x, *d_values)]
    import tensorflow as tf

    def tape_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = fn(x)
            loss = loss_of(out)
        return out, tape.gradient(loss, [x, *variables])

    if xla:
        tape_step = tf.function(tape_step, jit_compile=True)
    out, grads = tape_step(tf.convert_to_tensor(x))
    return [as_np(t) for t in (out, *grads)]


@pytest.fixture
def gradients():
    """`gradients(fn, x, variables)`, see `forward_backward`."""
    return forward_backward


def traced_op_types(layer, x, training, jit_compile=False):
    """The TensorFlow op types of `layer(x, training=training)` traced in a
    `tf.function` (a `jit_compile=True` one where `jit_compile`); nothing runs."""
    import tensorflow as tf

    fn = tf.function(lambda t: layer(t, training=training), jit_compile=jit_compile)
    return {op.type for op in fn.get_concrete_function(x).graph.get_operations()}


@pytest.fixture
def op_types():
    """`op_types(layer, x, training, jit_compile=False)`, see `traced_op_types`."""
    return traced_op_types


def write_cifar_archive(path, n_train=6, n_test=4, seed=0, folder=False, drop=None):
    """Writes CIFAR-100 in its real python format: pickles with b"data"
    (N, 3072) uint8 in CHW order, b"fine_labels", b"coarse_labels".

    Returns `(path written, {split: (NHWC images, labels)})`.
    """
    from nam_keras.cifar100 import CIFAR100_LABELS, FINE_TO_COARSE

    rng = np.random.default_rng(seed)
    expected = {}
    blobs = {}
    for split, n in (("train", n_train), ("test", n_test)):
        chw = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 100, size=n).tolist()
        blobs[split] = pickle.dumps(
            {
                b"data": chw.reshape(n, 3072),
                b"fine_labels": labels,
                b"coarse_labels": [FINE_TO_COARSE[label] for label in labels],
                b"filenames": [b"x.png"] * n,
            },
            protocol=2,
        )
        expected[split] = (chw.transpose(0, 2, 3, 1), np.array(labels))
    blobs["meta"] = pickle.dumps({b"fine_label_names": [n.encode() for n in CIFAR100_LABELS]})
    if drop:
        del blobs[drop]
    if folder:
        root = path / "cifar-100-python"
        root.mkdir(parents=True)
        for name, blob in blobs.items():
            (root / name).write_bytes(blob)
        return root, expected
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, expected


@pytest.fixture
def make_cifar_archive():
    """`make_cifar_archive(path, n_train=6, n_test=4, ...)`, see `write_cifar_archive`."""
    return write_cifar_archive


def all_layers(layer):
    """`layer` and every layer it holds, at any depth, through public attributes."""
    found = [layer]
    children = (
        layer.layers
        if isinstance(layer, keras.Model)
        else [v for v in vars(layer).values() if isinstance(v, keras.layers.Layer)]
    )
    for child in children:
        found.extend(all_layers(child))
    return found


@pytest.fixture
def layers_of():
    """`layers_of(model, cls)`: every layer of type `cls`, nested ones included."""
    return lambda model, cls: [la for la in all_layers(model) if isinstance(la, cls)]


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """A tiny NAM ResNet written by a real (short) train.py run."""
    import train

    root = tmp_path_factory.mktemp("trained")
    more = "--batch-size 16 --epochs 1 --steps-per-epoch 2 --val-freq 0 --verbose 0".split()
    args = [*TINY, *more, "--run-dir", str(root / "run"), "--output", str(root / "nam.keras")]
    assert train.main(args) == 0
    keras.mixed_precision.set_global_policy("float32")
    return root / "nam.keras"
