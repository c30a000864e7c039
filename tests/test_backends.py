"""Keras 3 on every backend: nam_keras without TensorFlow, .keras files across
backends, train.py on JAX, clear errors for what stays TensorFlow-only.

Each other backend runs in a child process (Keras picks its backend once per
process); TensorFlow, the suite's, runs here where a child would only cost time.
"""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
from xml.etree import ElementTree

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Writes a NAM ResNet (BatchNormNAM in every block) and a BAM one (convolutions, dense
# layers and BNs of its own), their BN variables (moving statistics included) set
# away from their initial values, with their predictions on fixed images. No fit:
# compiling costs more than the check. Every registered module's .keras file is
# reloaded in a fresh process by tests/test_attention_contract.py.
WRITE = """
import keras, numpy as np, nam_keras
rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (4, 16, 16, 3)).astype("float32")
for kind, kwargs in [("nam", None), ("bam", None)]:
    model = nam_keras.build_resnet(
        depth=18, width=4, input_shape=(16, 16, 3), attention=kind, attention_kwargs=kwargs
    )
    for w in model.weights:
        name = w.path.rsplit("/", 1)[-1]
        if name in ("gamma", "beta", "moving_mean", "moving_variance"):
            low = 0.5 if name in ("gamma", "moving_variance") else -0.5
            w.assign(rng.uniform(low, low + 1.0, w.shape).astype("float32"))
    model.save(f"{kind}.keras")
    np.save(f"{kind}.npy", keras.ops.convert_to_numpy(model(x, training=False)))
np.save("x.npy", x)
"""

READ = """
import keras, numpy as np, nam_keras
x = np.load("x.npy")
for kind in ["nam", "bam"]:
    model = keras.models.load_model(f"{kind}.keras")
    want = np.load(f"{kind}.npy")
    got = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
print("same predictions", keras.backend.backend())
"""


def python(code, backend, cwd, check=True, env=None):
    """Runs `code` in a child Python under `KERAS_BACKEND=backend` (and `env`)."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{backend} child failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


#: The model side's tests, which must pass on every backend (TensorFlow-only ones skip).
MODEL_SIDE_TESTS = [
    "tests/test_attention.py",
    "tests/test_attention_baselines.py",
    "tests/test_attention_contract.py",
    "tests/test_batch_norm_nam.py",
    "tests/test_device_augment.py",
    "tests/test_normalization.py",
    "tests/test_resnet.py",
    "tests/test_optimizers.py",
    "tests/test_callbacks.py",
    "tests/test_schedules.py",
]


#: The markers of the tests the JAX run skips (tests/conftest.py), and why.
SKIPPED_ON_JAX = ("tensorflow_only", "backend_independent")
SKIP_REASONS = ("TensorFlow-only; KERAS_BACKEND=jax", "the same on every backend")

#: A pytest plugin (`-p`) for the JAX run, which learns in the same process (no
#: second collection) which tests must skip: it writes to $NAM_MARKED the node ids
#: of those carrying one of the markers, as `-m "tensorflow_only or ..."` selects them.
MARKED_PLUGIN = f"""
import json, os
def pytest_collection_finish(session):
    marked = [
        item.nodeid for item in session.items
        if {{mark.name for mark in item.iter_markers()}} & {set(SKIPPED_ON_JAX)!r}
    ]
    with open(os.environ["NAM_MARKED"], "w") as f:
        json.dump(marked, f)
"""


def _junit_key(nodeid):
    """`(classname, name)` of a pytest node id as `--junitxml` writes it."""
    path, *names = nodeid.split("::")
    return ".".join([path.removesuffix(".py").replace("/", "."), *names[:-1]]), names[-1]


@pytest.mark.slow
def test_model_side_suite_passes_on_jax(tmp_path):
    """The layer, model, optimizer and callback tests, run again under JAX: every
    one passes, except those marked TensorFlow-only or backend-independent, which
    (and only which) skip."""
    (tmp_path / "nam_marked.py").write_text(MARKED_PLUGIN)
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["NAM_MARKED"] = str(marked := tmp_path / "marked.json")
    report = tmp_path / "jax.xml"
    plugins = ["-p", "no:xdist", "-p", "no:cacheprovider", "-p", "nam_marked"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *plugins, f"--junitxml={report}", *MODEL_SIDE_TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # which tests must skip: those carrying the markers, as the plugin found them
    must_skip = {_junit_key(nodeid) for nodeid in json.loads(marked.read_text())}
    outcomes, reasons = {}, set()
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        key = (case.get("classname"), case.get("name"))
        assert key not in outcomes, key
        skip = case.find("skipped")
        if skip is not None:
            reasons.add(skip.get("message", ""))
        failed = case.find("failure") is not None or case.find("error") is not None
        outcomes[key] = "failed" if failed else "skipped" if skip is not None else "passed"
    passed = [key for key, outcome in outcomes.items() if outcome == "passed"]
    skipped = {key for key, outcome in outcomes.items() if outcome == "skipped"}
    assert not [key for key, outcome in outcomes.items() if outcome == "failed"]
    assert skipped == must_skip, (sorted(skipped - must_skip), sorted(must_skip - skipped))
    assert all(reason.startswith(SKIP_REASONS) for reason in reasons), reasons
    # the floor: every collected test that is not marked passed
    assert len(passed) >= len(outcomes) - len(must_skip) > 0


#: What imports where TensorFlow cannot be imported: the model side, the schedules,
#: the optimizer, the settings, the data sources, the device-side input, the training
#: run (train.py runs there: tests/test_device_input.py), the reports and the client.
TENSORFLOW_FREE = (
    "nam_keras",
    "nam_keras.cifar100",
    "nam_keras.cli",
    "nam_keras.config",
    "nam_keras.data.device_augment",
    "nam_keras.data.device_input",
    "nam_keras.data.sources",
    "nam_keras.layers.attention",
    "nam_keras.layers.batch_norm_nam",
    "nam_keras.layers.attention_baselines",
    "nam_keras.layers.normalization",
    "nam_keras.models.resnet",
    "nam_keras.reports.compare",
    "nam_keras.reports.evaluation",
    "nam_keras.serving.client",
    "nam_keras.training.callbacks",
    "nam_keras.training.distribute",
    "nam_keras.training.experiment",
    "nam_keras.training.optimizers",
    "nam_keras.training.schedules",
    "nam_keras.training.trainer",
)


def test_import_and_build_without_tensorflow(tmp_path, no_tensorflow):
    out = python(
        no_tensorflow
        + f"""
import importlib
import keras, numpy as np
for name in {TENSORFLOW_FREE!r}:
    importlib.import_module(name)
import nam_keras
logits = nam_keras.build_resnet(depth=18, width=4)(np.zeros((2, 32, 32, 3), "uint8"))
assert logits.shape == (2, 100)
x = np.ones((2, 8, 8, 32), "float32")
counts = {{}}
for kind in ["nam", "se", "cbam", "bam"]:
    layer = nam_keras.create_attention(kind, kind)
    assert layer(x, training=True).shape == x.shape
    counts[kind] = layer.count_params()
assert not [m for m in sys.modules if m.startswith("tensorflow")], "tensorflow was imported"
for name in ("nam_keras.data.pipeline", "nam_keras.serving.export"):
    try:
        importlib.import_module(name)
        print(name, "imported")
    except ModuleNotFoundError as err:
        print(name, "->", err)
print(counts)
""",
        "jax",
        tmp_path,
        # etils (JAX's compilation cache) asks find_spec("tensorflow"), which the hook
        # makes raise, not answer None as without TensorFlow: the cache would fail.
        env={"EPATH_USE_TF": "false"},
    ).stdout
    # the tf.data pipeline stays TensorFlow; the export imports it only when used
    assert "nam_keras.data.pipeline -> No module named 'tensorflow'" in out
    assert "nam_keras.serving.export imported" in out
    counts = eval(out.strip().splitlines()[-1])
    # NAM: BN(32) = 4 x 32; SE: 2 x 32 x 2 + 2 + 32; CBAM: SE + 98 + 4
    assert (counts["nam"], counts["se"], counts["cbam"]) == (128, 162, 264)


def on_tensorflow(code, cwd, monkeypatch):
    """`python(code, "tensorflow", cwd).stdout`, run in this process where it runs
    TensorFlow (the suite's backend): no child to start, which costs seconds."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return python(code, "tensorflow", cwd).stdout
    out = io.StringIO()
    with monkeypatch.context() as here, contextlib.redirect_stdout(out):
        here.chdir(cwd)
        exec(textwrap.dedent(code), {"__name__": "__main__"})
    return out.getvalue()


def test_keras_files_travel_tensorflow_to_jax_and_back(tmp_path, monkeypatch):
    """Written on TensorFlow, read on JAX with the same predictions; written on
    JAX, read on TensorFlow likewise (one JAX process; TensorFlow's side here)."""
    on_tensorflow(WRITE, tmp_path, monkeypatch)
    there = tmp_path / "jax"
    there.mkdir()
    back = READ + f"\nimport os\nos.chdir({str(there)!r})\n" + WRITE
    assert "same predictions jax" in python(back, "jax", tmp_path).stdout
    assert "same predictions tensorflow" in on_tensorflow(READ, there, monkeypatch)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch not installed")
def test_keras_files_load_on_torch(tmp_path):
    python(WRITE, "tensorflow", tmp_path)
    assert "same predictions torch" in python(READ, "torch", tmp_path).stdout


@pytest.mark.slow
def test_train_on_jax_with_tf_data_records_the_backend(tmp_path, tiny_args, run_script):
    """train.py on JAX with TensorFlow installed: the host's tf.data input (the
    resume on JAX: tests/test_device_input.py); the model loads on TensorFlow."""
    args = tiny_args("--epochs", "2", "--steps-per-epoch", "2", "--val-freq", "0")
    proc = run_script("train.py", args, env={"KERAS_BACKEND": "jax"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "Keras backend jax" in out and "XLA on" in out and "input: tf.data on the host" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["backend"], config["strategy"], config["jit_compile"], config["input"]) == (
        "jax",
        "one device",
        True,
        "host",
    )
    import keras

    import nam_keras  # noqa: F401  (registers the classes of the file)

    assert keras.models.load_model(tmp_path / "run.keras").name == "resnet18_nam"  # TensorFlow


def test_tensorflow_only_features_are_refused_by_name(tmp_path, run_script):
    env = {"KERAS_BACKEND": "jax"}
    proc = run_script("train.py", ["--dataset", "synthetic", "--no-sync-bn"], env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "--no-sync-bn needs tf.distribute, which only the TensorFlow backend has" in out
    assert "BN statistics over the global batch" in out
    cluster = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", **env}
    proc = run_script("train.py", ["--dataset", "synthetic"], env=cluster)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "train.py: error: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers" in out
    assert not (tmp_path / "runs").exists()
    proc = run_script("evaluate.py", ["missing.keras", "--export", str(tmp_path / "x")], env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "the TF Serving export needs the TensorFlow backend" in out
    assert "KERAS_BACKEND=tensorflow python evaluate.py MODEL --export DIR" in out
    assert np.array_equal(os.listdir(tmp_path), [])
