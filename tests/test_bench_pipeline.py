"""bench/pipeline.py at tiny sizes: a row per recipe, host (tf.data) and
device side (jitted on JAX in a child process), with consistent figures."""

import importlib.util
import json
import math
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)  # for its `import harness`
    spec = importlib.util.spec_from_file_location(
        "bench_pipeline", os.path.join(BENCH, "pipeline.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = "--steps 2 --warmup 1 --train-size 256 --batch-size 32".split()


def test_every_recipe_has_a_host_row_and_the_cores_to_feed_a_gpu(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main([*TINY, "--no-device", "--threads", "1", "--json", str(out)])
    assert list(result["host"]) == list(bench.RECIPES) and result["device"] == {}
    for row in result["host"].values():
        per_core = row["images_per_s_per_core"]
        assert per_core > 0 and row["wall_images_per_s"] > 0
        for target in (12_000, 25_000):
            assert row[f"cores_for_{target}"] == math.ceil(target / per_core) >= 1
    assert json.loads(out.read_text())["host"] == result["host"]
    table = capsys.readouterr().out
    assert "img/s/core" in table and "cores 25k" in table and "randaugment" in table


def test_device_rows_run_jitted_on_jax_in_a_child(bench):
    args = bench.parse([*TINY, "--recipes", "crop-flip,randaugment"])
    rows = bench.device_rows_in_child(args)
    assert list(rows) == ["crop-flip"]  # RandAugment has no device-side form
    assert all(row["images_per_s_per_core"] > 0 for row in rows.values())


def test_unknown_recipes_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse(["--recipes", "reference,autoaugment"])
    assert "unknown recipes ['autoaugment']" in capsys.readouterr().err
