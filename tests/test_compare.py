"""The comparison report: figures from hand-written logs, and the README's smoke comparison."""

import json
import os
import re
import shlex

import pytest

import train
from nam_keras.errors import ConfigError
from nam_keras.reports import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, model, rows, summary=None):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model": model, "recipe": "official"}, f)
    with open(os.path.join(folder, "log.csv"), "w") as f:
        f.write("epoch,lr,top1,top5,train_images_per_s,val_top1,val_top5\n")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")
    if summary is not None:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(summary, f)


def test_figures_of_one_run_by_hand(tmp_path):
    # validation every other epoch: Keras' CSVLogger writes NA where it did not run
    rows = [
        (0, 0.1, 0.20, 0.40, 50.0, "NA", "NA"),
        (1, 0.1, 0.40, 0.60, 100.0, 0.30, 0.55),
        (2, 0.02, 0.60, 0.80, 120.0, "NA", "NA"),
        (3, 0.02, 0.70, 0.90, 110.0, 0.25, 0.50),
    ]
    summary = {"complete": True, "parameters": 1234, "multiply_adds": 5_000_000}
    write_run(tmp_path / "nam", "nam", rows, summary)
    row = compare.summarise(compare.read_run(str(tmp_path / "nam")))
    assert row["attention"] == "nam" and row["epochs"] == 4 and row["complete"]
    assert (row["best_val_top1"], row["final_val_top1"]) == (0.30, 0.25)
    assert (row["best_val_top5"], row["final_val_top5"]) == (0.55, 0.50)
    assert row["final_train_top1"] == 0.70 and row["gap_top1"] == pytest.approx(0.45)
    assert row["train_images_per_s"] == 110.0  # median of 100, 120, 110: the first epoch left out
    table = compare.markdown_table([row])
    assert "| nam | nam | 1,234 | 5.0 M | 110.0 | 4 | 30.00% | 55.00% | 25.00% |" in table


def test_missing_figures_are_dashes_not_errors(tmp_path):
    write_run(tmp_path / "b", "baseline", [(0, 0.1, 0.2, 0.4, "", "NA", "NA")])
    row = compare.summarise(compare.read_run(str(tmp_path / "b")))
    assert row["best_val_top1"] is None and row["gap_top1"] is None
    assert row["parameters"] is None and row["train_images_per_s"] is None
    assert "| b | baseline | - | - | - | 1 | - |" in compare.markdown_table([row])


def test_not_a_run_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"no config.json: not a run directory"):
        compare.read_run(str(tmp_path))
    assert compare.main([str(tmp_path / "missing")]) == 2
    assert "missing is not a folder" in capsys.readouterr().err
    write_run(tmp_path / "empty", "nam", [])
    with pytest.raises(ConfigError, match=r"log.csv has no epoch yet"):
        compare.read_run(str(tmp_path / "empty"))


def readme_smoke_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("The CPU smoke version", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines()]


@pytest.mark.slow
def test_readme_smoke_comparison(tmp_path, monkeypatch):
    """The README's CPU smoke comparison, line by line, in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    commands = readme_smoke_commands()
    assert [c[:2] for c in commands] == [
        ["mkdir", "-p"],
        ["python", "train.py"],
        ["python", "train.py"],
        ["python", "-m"],
    ]
    os.makedirs(commands[0][2])
    for argv in commands[1:3]:
        assert train.main(argv[2:]) == 0
    assert compare.main(commands[3][3:]) == 0
    out = tmp_path / "runs" / "smoke-comparison"
    for name in ("accuracy.png", "learning_rate.png"):
        assert (out / name).read_bytes().startswith(PNG) and (out / name).stat().st_size > 10_000
    rows = json.loads((out / "comparison.json").read_text())["runs"]
    assert [r["attention"] for r in rows] == ["nam", "baseline"]
    assert all(r["epochs"] == 3 and r["complete"] and r["recipe"] == "official" for r in rows)
    assert rows[0]["parameters"] > rows[1]["parameters"]  # NAM's BN weights
    assert rows[0]["multiply_adds"] == rows[1]["multiply_adds"]  # NAM adds no conv or dense
    table = (out / "comparison.md").read_text()
    assert table.count("\n") == 4 and "| smoke-nam | nam |" in table
    log = (tmp_path / "runs" / "smoke-nam" / "log.csv").read_text().splitlines()
    header = log[0].split(",")
    assert {"nam_near_zero", "nam_max_weight", "train_images_per_s"} <= set(header)
    lrs = [float(line.split(",")[header.index("lr")]) for line in log[1:]]
    assert lrs == pytest.approx([0.1, 0.1, 0.02])  # multistep: x0.2 from epoch 2 (0-based) on
    config = json.loads((tmp_path / "runs" / "smoke-nam" / "config.json").read_text())
    assert (config["schedule"], config["milestones"], config["stop_gradient"]) == (
        "multistep",
        [2],
        True,
    )
