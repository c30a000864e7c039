"""Precision/XLA choices and the tf.distribute strategies (two logical CPUs, two workers)."""

import json
import logging
import socket
import time

import keras
import numpy as np
import pytest

import nam_keras
from nam_keras.errors import ConfigError
from nam_keras.training import distribute


@pytest.mark.parametrize(
    "precision, cpu_bf16, want",
    [
        ("auto", True, "mixed_bfloat16"),
        ("auto", False, "float32"),
        ("float32", True, "float32"),
        ("mixed_float16", False, "mixed_float16"),
    ],
)
def test_resolve_precision_on_cpus(monkeypatch, precision, cpu_bf16, want):
    monkeypatch.setattr(distribute, "cpu_prefers_bf16", lambda: cpu_bf16)
    assert distribute.resolve_precision(precision, gpus=[]) == want


def test_resolve_precision_on_gpus_and_other_backends(monkeypatch):
    monkeypatch.setattr(distribute, "cpu_prefers_bf16", lambda: True)
    assert distribute.resolve_precision("auto", [("H100", 9)]) == "mixed_bfloat16"
    assert distribute.resolve_precision("auto", [("V100", 7)], "jax") == "mixed_float16"
    # bf16 on AMX CPUs was measured with TensorFlow only
    assert distribute.resolve_precision("auto", [], "jax") == "float32"


@pytest.mark.parametrize(
    "flags, want",
    [
        ("fpu sse avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids
        ("fpu sse avx512f avx512_bf16", False),  # AVX512-BF16 without AMX (AMD EPYC)
        ("fpu sse avx2", False),
    ],
)
def test_bf16_only_where_the_cpu_has_amx(flags, want):
    cpuinfo = f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n"
    assert distribute.cpu_prefers_bf16(cpuinfo) is want


def test_resolve_jit():
    assert distribute.resolve_jit("auto", gpus=[]) is False
    assert distribute.resolve_jit("auto", gpus=[("GPU:0", 9)]) is True
    assert distribute.resolve_jit("auto", gpus=[], backend_name="jax") is True  # jit, always
    assert distribute.resolve_jit("auto", gpus=[("cuda:0", 9)], backend_name="torch") is False
    assert distribute.resolve_jit("on", gpus=[]) is True
    assert distribute.resolve_jit("off", gpus=[("GPU:0", 9)]) is False


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(tmp_path, tiny_args, run_script):
    proc = run_script(
        "train.py", tiny_args("--epochs", "1", "--steps-per-epoch", "2", "--cpu-replicas", "2")
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "trains on 2 devices with MirroredStrategy" in out and "synchronised BN" in out
    assert "global batch 8 (4 per replica)" in out
    keras.models.load_model(tmp_path / "run.keras")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_two_processes(tmp_path, tiny_args, run_script):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(
            run_script(
                "train.py",
                tiny_args(
                    "--epochs", "1", "--steps-per-epoch", "3", "--val-freq", "0", name=f"worker{i}"
                ),
                env={"TF_CONFIG": tf_config},
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "trains on 2 devices with MultiWorkerMirroredStrategy" in out
    # trainable weights, optimizer state and (synchronised) BN statistics alike
    w0, w1 = (
        keras.models.load_model(tmp_path / f"worker{i}.keras").get_weights() for i in range(2)
    )
    initial = nam_keras.build_resnet(depth=18, width=4)  # weights moved away from any init
    assert len(w0) == len(w1) == len(initial.get_weights())
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_worker_that_never_starts_is_reported_after_the_timeout(tmp_path, tiny_args, run_script):
    ports = _free_ports(2)  # nobody will listen on the second one
    tf_config = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": 0},
        }
    )
    start = time.monotonic()
    proc = run_script(
        "train.py",
        tiny_args("--epochs", "1", "--cluster-timeout", "1"),
        env={"TF_CONFIG": tf_config},
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert f"worker(s) 127.0.0.1:{ports[1]} of TF_CONFIG did not start within 1 s" in out
    assert time.monotonic() - start < 60


def test_tf_config_with_a_chief():
    text = json.dumps(
        {
            "cluster": {"chief": ["c:1"], "worker": ["w:2", "w:3"]},
            "task": {"type": "worker", "index": 1},
        }
    )
    assert distribute.read_tf_config(text) == (["c:1", "w:2", "w:3"], 2)
    assert distribute.read_tf_config("") == ([], 0)


def test_waiting_for_workers_is_logged(monkeypatch, caplog):
    """A missing TF_CONFIG worker used to mean --cluster-timeout seconds of silence."""
    monkeypatch.setattr(logging.getLogger("nam_keras"), "propagate", True)  # to caplog
    caplog.set_level(logging.INFO, logger="nam_keras")
    monkeypatch.setattr(distribute, "WAIT_LOG_INTERVAL", 0.3, raising=False)
    monkeypatch.setattr(distribute, "unreachable_workers", lambda workers, index: [workers[1]])
    workers = [f"127.0.0.1:{_free_ports(1)[0]}", "10.255.0.9:2222"]
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"worker\(s\) 10.255.0.9:2222 of TF_CONFIG did not"):
        distribute.wait_for_workers(workers, 0, timeout=1.0)
    assert time.monotonic() - start < 10
    first, *others = dict.fromkeys(caplog.messages)  # once each (handlers may repeat them)
    assert first == (
        "waiting for worker(s) 10.255.0.9:2222 of TF_CONFIG (this is worker 0 of 2; "
        "giving up after --cluster-timeout 1 s)"
    )
    assert 1 <= len(others) <= 6  # about every WAIT_LOG_INTERVAL s (loose: a loaded machine)
    assert all(m.startswith("still waiting for worker(s) 10.255.0.9:2222") for m in others)
    assert others[-1].endswith("s of --cluster-timeout 1 s")


def test_the_end_of_a_wait_is_logged_and_no_wait_is_silent(monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("nam_keras"), "propagate", True)
    caplog.set_level(logging.INFO, logger="nam_keras")
    monkeypatch.setattr(distribute.time, "sleep", lambda s: None)
    answers = iter([["b:2"], []])
    monkeypatch.setattr(distribute, "unreachable_workers", lambda w, i: next(answers))
    distribute.wait_for_workers([f"127.0.0.1:{_free_ports(1)[0]}", "b:2"], 0, timeout=5)
    assert caplog.messages[-1] == "all 2 workers of TF_CONFIG are up"
    caplog.clear()
    monkeypatch.setattr(distribute, "unreachable_workers", lambda w, i: [])
    distribute.wait_for_workers([f"127.0.0.1:{_free_ports(1)[0]}", "b:2"], 0, timeout=5)
    assert caplog.messages == []
