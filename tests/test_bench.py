"""The benchmarks' harness: hand-written NAM variants are checked against the layer."""

import os

import numpy as np
import pytest
import tensorflow as tf

from nam_keras import NAMAttention

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture
def bench_dir_on_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)


@pytest.fixture
def bench(bench_dir_on_path):
    import harness
    import nam_layer

    return harness, nam_layer


def _nam(shape, rng):
    layer = NAMAttention()
    layer.build(shape)
    layer.channel_bn.gamma.assign(rng.uniform(0.2, 2.0, shape[-1]).astype("float32"))
    return layer


def test_every_variant_of_the_layer_bench_equals_nam_attention(bench, rng):
    harness, nam_layer = bench
    x = tf.constant(rng.normal(size=(4, 5, 5, 8)).astype("float32"))
    for variant in nam_layer.VARIANTS.values():
        harness.check_against_nam(variant, _nam(x.shape, rng), x)


def test_a_wrong_variant_is_refused(bench, rng):
    harness, _ = bench
    x = tf.constant(rng.normal(size=(4, 5, 5, 8)).astype("float32"))

    def unweighted(x, gamma, beta):  # forgets w = |gamma| / sum |gamma|
        mean, var = tf.nn.moments(x, [0, 1, 2])
        return tf.sigmoid(tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-5)) * x

    with pytest.raises(AssertionError, match="output differs"):
        harness.check_against_nam(unweighted, _nam(x.shape, rng), x)


def test_layer_bench_runs_in_seconds(bench, tmp_path):
    _, nam_layer = bench
    out = tmp_path / "nam_layer.json"
    rows = nam_layer.main(
        ["--shape", "2", "4", "4", "8", "--steps", "1", "--warmup", "0", "--json", str(out)]
    )
    assert "NAMAttention as shipped" in rows and all(np.isfinite(list(rows.values())))
    assert out.read_text().startswith("{")


@pytest.mark.slow
def test_chaos_run_survives_random_kills(bench_dir_on_path, tmp_path):
    import chaos

    report = chaos.chaos(
        rounds=2,
        epochs=2,
        steps=3,
        max_delay=6.0,
        seed=1,
        signals=["KILL", "TERM"],
        workdir=str(tmp_path),
    )
    assert report["survived"] == 2 and report["optimizer_steps"] == 6
    assert [r["signal"] for r in report["rounds"]] and all(
        r["exit"] in chaos.SIGNALLED | {0} for r in report["rounds"]
    )


@pytest.mark.slow
def test_gpu_bench_smoke_mode_runs_every_keras_path_on_jax(tmp_path):
    """bench/gpu.py on a CPU, seconds: the jitted stateless steps, bf16, several
    steps per execution, the matmul peak and the summary (PyTorch rows when
    PyTorch is installed)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "gpu.json"
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "gpu.py"), "--smoke", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    keras_rows = [r for r in result["rows"] if r["framework"] == "keras-jax"]
    assert [(r["precision"], r["batch"], r["config"]) for r in keras_rows] == [
        ("mixed_bfloat16", 8, "XLA, steps_per_execution 2")
    ]
    assert all(r["baseline"] > 0 and r["nam"] > 0 for r in result["rows"])
    summary = result["summary"]
    assert summary["bf16_matmul_peak_tflops"] > 0
    assert 0 < summary["nam_fraction_of_peak"] < 1
    assert summary["nam_overhead_at_best"] == pytest.approx(
        keras_rows[0]["baseline"] / keras_rows[0]["nam"]
    )
