"""The benchmarks' harness: hand-written NAM variants are checked against the layer."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from nam_keras import NAMAttention

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_bench_on_jax(script, tmp_path, *args):
    """Runs bench/`script` with `args` in a child process on JAX; returns its --json."""
    import json
    import subprocess
    import sys

    out = tmp_path / f"{script}.json"
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *args, "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return json.loads(out.read_text())


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
        rounds=1,
        epochs=2,
        steps=3,
        max_delay=6.0,
        seed=1,
        signals=["KILL"],
        workdir=str(tmp_path),
    )
    assert report["survived"] == 1 and report["optimizer_steps"] == 6
    assert [r["signal"] for r in report["rounds"]] and all(
        r["exit"] in chaos.SIGNALLED | {0} for r in report["rounds"]
    )


@pytest.mark.slow
def test_gpu_bench_smoke_mode_runs_every_keras_path_on_jax(tmp_path):
    """bench/gpu.py on a CPU, seconds: the jitted stateless steps of the five
    models, bf16, several steps per execution, the matmul peak, the summary
    (each model against the baseline; PyTorch rows when PyTorch is installed),
    and train.py end to end for NAM on one device (the smoke's `cpu_replicas`
    is 1: two devices are trained on in tests/test_device_input.py)."""

    result = run_bench_on_jax("gpu.py", tmp_path, "--smoke")
    keras_rows = [r for r in result["rows"] if r["framework"] == "keras-jax"]
    assert [(r["precision"], r["batch"], r["config"]) for r in keras_rows] == [
        ("mixed_bfloat16", 8, "XLA, steps_per_execution 1"),
        ("mixed_bfloat16", 8, "XLA, steps_per_execution 2"),
    ]
    models = ["baseline", "nam", "se", "cbam", "bam"]
    assert all(r[m] > 0 for r in keras_rows for m in models)
    assert all(r["baseline"] > 0 and r["nam"] > 0 for r in result["rows"])
    summary = result["summary"]
    assert summary["bf16_matmul_peak_tflops"] > 0
    assert list(summary["models"]) == models
    for m, figures in summary["models"].items():
        best = max(keras_rows, key=lambda r: r[m])
        assert 0 < figures["fraction_of_peak"] < 1
        assert figures["cost_vs_baseline"] == pytest.approx(best["baseline"] / best[m])
    end_to_end = result["end_to_end"]
    assert [(r["model"], r["devices"]) for r in end_to_end] == [("nam", 1)]
    nam_step = max(r["nam"] for r in keras_rows)
    for r in end_to_end:
        assert "error" not in r, r.get("output_tail")
        assert r["images_per_s"] > 0
        assert r["vs_step"] == pytest.approx(r["images_per_s"] / nam_step)
    assert summary["end_to_end_vs_step"] == {"nam on 1": end_to_end[0]["vs_step"]}


@pytest.fixture
def gpu_bench(bench_dir_on_path, monkeypatch):
    """bench/gpu.py imported here, the environment's backend kept."""
    import keras

    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())  # its setdefault: a no-op
    import gpu

    return gpu


def test_gpu_bench_models_devices_and_train_py_outputs(gpu_bench, tmp_path, monkeypatch):
    """bench/gpu.py's pieces around its child processes: `--models`, the device
    counts of the end-to-end runs, log.csv's last epoch, a failing child."""
    import sys

    assert gpu_bench.model_list("bam, NAM") == ("baseline", "nam", "bam")
    with pytest.raises(SystemExit, match="unknown models"):
        gpu_bench.model_list("nam,eca")

    cfg = {**gpu_bench.SMOKE, "end_to_end": {**gpu_bench.SMOKE["end_to_end"], "cpu_replicas": 2}}
    assert gpu_bench.device_counts(cfg, "cpu", 1) == [(1, [], {}), (2, ["--cpu-replicas", "2"], {})]
    assert gpu_bench.device_counts(gpu_bench.SMOKE, "cpu", 1) == [(1, [], {})]
    assert gpu_bench.device_counts(gpu_bench.FULL, "cpu", 1) == [(1, [], {})]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    first = (1, [], {"CUDA_VISIBLE_DEVICES": "0"})
    assert gpu_bench.device_counts(cfg, "gpu", 4) == [first, (4, [], {})]
    assert gpu_bench.device_counts(cfg, "gpu", 1) == [first]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_bench.device_counts(cfg, "gpu", 2)[0] == (1, [], {"CUDA_VISIBLE_DEVICES": "3"})

    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,train_images_per_s\n0,4.6,12.5\n1,4.5,150.25\n")
    assert gpu_bench.last_epoch_images_per_s(str(log)) == 150.25
    log.write_text("epoch,loss,train_images_per_s\n0,4.6,NA\n")
    assert gpu_bench.last_epoch_images_per_s(str(log)) is None
    assert gpu_bench.last_epoch_images_per_s(str(tmp_path / "missing.csv")) is None

    fails = [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]
    assert gpu_bench.run_child(fails) == ("boom\n", "exit status 3")
    sleeps = [sys.executable, "-c", "import time; time.sleep(30)"]
    assert gpu_bench.run_child(sleeps, timeout=0.5)[1] == "timed out after 0.5 s"


@pytest.fixture
def xla_cost(bench_dir_on_path, monkeypatch):
    """bench/xla_cost.py imported here, the environment's backend kept."""
    import keras

    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())  # its setdefault: a no-op
    import xla_cost

    return xla_cost


def test_xla_cost_reads_a_dict_or_a_list_of_dicts(xla_cost):
    one = {"flops": 10.0, "bytes accessed": 4.0, "utilization0{}": 1.0}
    assert xla_cost.cost_figures(one) == {
        "flops": 10.0,
        "bytes_accessed": 4.0,
        "transcendentals": 0.0,
    }
    several = [one, {"flops": 1.0, "bytes accessed": 2.0, "transcendentals": 3.0}]
    assert xla_cost.cost_figures(several) == {
        "flops": 11.0,
        "bytes_accessed": 6.0,
        "transcendentals": 3.0,
    }
    with pytest.raises(RuntimeError, match="no cost analysis"):
        xla_cost.cost_figures(None)


def test_xla_cost_modules_put_the_baseline_first_and_one_nam_row_per_kwargs(xla_cost):
    from types import SimpleNamespace

    args = SimpleNamespace(
        modules="se,nam,nam_unfused", nam_kwargs=["{}", '{"float32_gate": true}']
    )
    unfused = {"fuse_attention": False}
    assert xla_cost.module_list(args) == [
        ("baseline", None, {}, {}),
        ("se", "se", {}, {}),
        ("nam", "nam", {}, {}),
        ('nam {"float32_gate": true}', "nam", {"float32_gate": True}, {}),
        ("nam_unfused", "nam", {}, unfused),
        ('nam_unfused {"float32_gate": true}', "nam", {"float32_gate": True}, unfused),
    ]
    with pytest.raises(SystemExit, match="unknown modules"):
        xla_cost.module_list(SimpleNamespace(modules="nam,eca", nam_kwargs=None))


@pytest.mark.slow
def test_xla_cost_bench_smoke_mode_costs_the_step_on_jax(tmp_path):
    """bench/xla_cost.py --smoke on a CPU, seconds: the jitted training step of the
    plain network and of NAM lowered, compiled and costed by XLA, relative to the
    baseline (two modules keep it short; the module list is tested above)."""

    result = run_bench_on_jax("xla_cost.py", tmp_path, "--smoke", "--modules", "nam")
    assert result["settings"] == {
        "depth": 18,
        "width": 4,
        "size": 16,
        "batch": 4,
        "precision": "mixed_bfloat16",
    }
    rows = {r["module"]: r for r in result["rows"]}
    assert list(rows) == ["baseline", "nam"]
    figures = ("flops", "bytes_accessed", "flops_ratio", "bytes_ratio")
    assert all(np.isfinite(r[k]) and r[k] > 0 for r in rows.values() for k in figures)
    assert rows["baseline"]["flops_ratio"] == rows["baseline"]["bytes_ratio"] == 1.0
    assert rows["nam"]["flops_ratio"] > 1 or rows["nam"]["bytes_ratio"] > 1
    for r in rows.values():
        assert r["bytes_ratio"] == pytest.approx(
            r["bytes_accessed"] / rows["baseline"]["bytes_accessed"]
        )


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_xla_cost_bench_costs_tensorflow_s_xla_step(bench_dir_on_path, tmp_path):
    """bench/xla_cost.py under KERAS_BACKEND=tensorflow (this process's): TensorFlow's
    own step, compiled with `jit_compile=True`, costed by XLA through jaxlib; the
    fused NAM moves no more bytes than the plain network (1.28x before it was fused
    under TensorFlow's XLA, for ResNet-50)."""
    import xla_cost

    args = ["--smoke", "--modules", "nam", "--json", str(tmp_path / "tf.json")]
    rows = {r["module"]: r for r in xla_cost.main(args)}
    assert list(rows) == ["baseline", "nam"]
    assert json.loads((tmp_path / "tf.json").read_text())["backend"] == "tensorflow"
    assert all(r["flops"] > 0 and r["bytes_accessed"] > 0 for r in rows.values())
    assert rows["nam"]["bytes_ratio"] <= 1.01
