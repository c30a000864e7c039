"""The quiet start: TensorFlow's start-up noise dropped, everything else kept."""

import os
import sys

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
