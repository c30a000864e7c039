"""The quiet start: TensorFlow's start-up noise dropped, everything else kept."""

import logging
import os
import subprocess
import sys
import warnings

from nam_keras import console


def test_noise_is_dropped_and_real_messages_kept(capfd):
    with console.quiet_startup():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are\n")
        os.write(2, b"I0000 1 port.cc:153] oneDNN custom operations are on. You may see\n")
        os.write(2, b"E0000 2 cuda_platform.cc:52] failed call to cuInit: CUDA error\n")
        os.write(2, b"E0000 3 op_kernel.cc:1] OOM when allocating tensor\n")
        print("a Python warning", file=sys.stderr)
    err = capfd.readouterr().err  # (pytest's sys.stderr is not fd 2: order may differ)
    assert sorted(err.splitlines()) == [
        "E0000 3 op_kernel.cc:1] OOM when allocating tensor",
        "a Python warning",
    ]


def test_disabled_changes_nothing(capfd):
    with console.quiet_startup(enabled=False):
        os.write(2, b"oneDNN custom operations are on\n")
    assert capfd.readouterr().err == "oneDNN custom operations are on\n"


def test_train_py_speaks_first(run_script, tmp_path):
    """Without TF_CPP_MIN_LOG_LEVEL set, the first line is ours: device and
    precision, before the (here: missing) data is looked at."""
    args = ["--data-dir", str(tmp_path / "missing"), "--precision", "float32"]
    args += ["--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "m.keras")]
    proc = run_script("train.py", args, env={"TF_CPP_MIN_LOG_LEVEL": None})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    first = out.splitlines()[0]
    assert first.startswith("[nam-keras] device: CPU") and "precision float32" in first
    assert "missing" in out.splitlines()[-1]  # then the real error, shown
    assert "oneDNN" not in out and "absl::InitializeLog" not in out and "cuInit" not in out


def test_our_warnings_are_one_line_and_tfds_notes_dropped():
    other = warnings.formatwarning
    ours = console.one_line_warnings(other)
    inside = os.path.join(console.PACKAGE_DIR, "data", "sources.py")
    assert ours("a subset", UserWarning, inside, 66, "warnings.warn(") == (
        "[nam-keras] warning: a subset\n"
    )
    assert ours("theirs", UserWarning, "/elsewhere/k.py", 3, "x") == other(
        "theirs", UserWarning, "/elsewhere/k.py", 3, "x"
    )
    records = []
    absl = logging.getLogger("absl")
    handler = logging.Handler()
    handler.emit = records.append
    absl.addHandler(handler)
    try:
        console.tidy_python_messages()  # (importing nam_keras did it already: idempotent)
        absl.warning("Variant folder /data/cifar100/3.0.2 has no dataset_info.json")
        absl.warning("another note")
    finally:
        absl.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["another note"]
    assert warnings.formatwarning.nam_keras and len(absl.filters) == 1


def test_every_entry_point_starts_quietly(tmp_path, make_cifar_archive):
    """`import nam_keras` (here through the comparison's command line) without
    TF_CPP_MIN_LOG_LEVEL: no oneDNN, CPU-feature or CUDA notes, our warning (a
    small archive) on one line, then the error."""
    archive, _ = make_cifar_archive(tmp_path / "c.tar.gz")
    script = (
        "import sys\n"
        "from nam_keras.reports import compare\n"  # imports TensorFlow: first
        "from nam_keras.data import sources\n"
        "import keras; keras.ops.ones((2,)).numpy()\n"  # a first operation
        f"sources.load_cifar100_arrays(data_dir={str(archive)!r})\n"
        "sys.exit(compare.main(['missing']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.pop(console.QUIET_START, None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    subset = "split has {} examples, fewer than CIFAR-100's {}; using it as a subset."
    assert proc.stderr.splitlines() == [
        f"[nam-keras] warning: {archive}: train {subset.format(6, 50000)}",
        f"[nam-keras] warning: {archive}: test {subset.format(4, 10000)}",
        "python -m nam_keras.reports.compare: error: missing is not a folder; expected a run "
        "directory of train.py",
    ]
