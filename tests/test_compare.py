"""The comparison report: figures from hand-written logs, and the README's smoke comparison."""

import json
import math
import os
import re
import shlex

import pytest

import train
from nam_keras.errors import ConfigError
from nam_keras.reports import compare
from nam_keras.training import run_directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, model, rows, summary=None, dataset="cifar100"):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model": model, "recipe": "official", "dataset": dataset}, f)
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


GOOD_LOG = "epoch,lr,top1,top5,train_images_per_s,val_top1,val_top5\n0,0.1,0.2,0.4,50,0.1,0.3\n"


def _set(name, content):
    """A case step: writes `content` (text, bytes or a JSON value) to `name` in the run."""

    def step(folder):
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))

    return step


def _remove(name):
    return lambda folder: os.remove(folder / name)


def _deep(depth=200_000):
    return '{"a": ' + "[" * depth + "]" * depth + "}"


ERROR_CASES = {
    "log.csv missing": (_remove("log.csv"), r"log.csv is missing"),
    "log.csv empty": (_set("log.csv", ""), r"log.csv has no epoch yet"),
    "log.csv header only": (_set("log.csv", GOOD_LOG.split("\n")[0] + "\n"), r"no epoch yet"),
    "log.csv invalid UTF-8": (_set("log.csv", b"epoch,top1\n0,\xff\n"), r"log.csv is not UTF-8"),
    "log.csv a folder": (
        lambda f: (os.remove(f / "log.csv"), os.mkdir(f / "log.csv")),
        r"cannot read \S*log.csv \(",
    ),
    "log.csv row short": (_set("log.csv", GOOD_LOG + "1,0.1\n"), r"line 3 has 2 fields, the"),
    "log.csv row long": (_set("log.csv", GOOD_LOG + "1" + ",0" * 7 + "\n"), r"line 3 has 8 "),
    "log.csv no epoch column": (_set("log.csv", "lr,top1\n0.1,0.2\n"), r"no 'epoch' column"),
    "epoch not a number": (_set("log.csv", "epoch,top1\nabc,0.2\n"), r"line 2: epoch 'abc' is"),
    "epoch NA": (_set("log.csv", "epoch,top1\nNA,0.2\n"), r"line 2: epoch 'NA' is not"),
    "epoch fraction": (_set("log.csv", "epoch,top1\n1.5,0.2\n"), r"epoch '1.5' is not a whole"),
    "epoch 5000 digits": (_set("log.csv", "epoch\n" + "9" * 5000 + "\n"), r"epoch '9999"),
    "top1 is text": (_set("log.csv", "epoch,top1\n0,abc\n"), r"line 2: top1 'abc' is not a"),
    "config.json missing": (_remove("config.json"), r"no config.json: not a run directory"),
    "config.json a list": (_set("config.json", [1, 2]), r"config.json is a JSON list, not an"),
    "config.json not JSON": (_set("config.json", "{"), r"config.json is damaged \(JSONDecode"),
    "config.json invalid UTF-8": (_set("config.json", b'{"model": "\xff"}'), r"json is damaged"),
    "config.json deep": (_set("config.json", _deep()), r"config.json is damaged \(Recursion"),
    "model a list": (_set("config.json", {"model": ["nam"]}), r"""'model' is \['nam'\], not"""),
    "model a number": (_set("config.json", {"model": 3}), r"config.json: 'model' is 3, not a"),
    "recipe a dict": (_set("config.json", {"model": "nam", "recipe": {}}), r"'recipe' is \{\}"),
    "summary.json a list": (_set("summary.json", []), r"summary.json is a JSON list, not an"),
    "summary.json not JSON": (_set("summary.json", "nope"), r"summary.json is damaged"),
    "summary.json deep": (_set("summary.json", _deep()), r"summary.json is damaged \(Recursion"),
    "parameters text": (_set("summary.json", {"parameters": "abc"}), r"'parameters' is 'abc', no"),
    "multiply_adds list": (_set("summary.json", {"multiply_adds": [1, 2]}), r"is \[1, 2\], not"),
    "parameters bool": (_set("summary.json", {"parameters": True}), r"'parameters' is True, not"),
    "parameters negative": (_set("summary.json", {"parameters": -1}), r"'parameters' is -1, not"),
    "parameters huge": (_set("summary.json", {"parameters": 10**400}), r"'parameters' is 1000"),
    "complete text": (_set("summary.json", {"complete": "yes"}), r"'complete' is 'yes', not true"),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_a_file_train_py_does_not_write_is_a_clear_error(case, tmp_path, capsys):
    damage, message = ERROR_CASES[case]
    write_run(tmp_path / "run", "nam", [(0, 0.1, 0.2, 0.4, 50, 0.1, 0.3)], {"complete": True})
    damage(tmp_path / "run")
    assert compare.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{compare.PROG}: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert len(err) < 400 and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("run_dir", ["missing", "a-file"])
def test_a_run_directory_that_is_not_a_folder_is_a_clear_error(run_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("{}")
    assert compare.main([str(tmp_path / run_dir), "--out", str(tmp_path / "out")]) == 2
    assert f"{run_dir} is not a folder; expected a run directory" in capsys.readouterr().err


def test_read_json_of_the_training_run_calls_deep_nesting_damage(tmp_path):
    (tmp_path / "config.json").write_text(_deep())
    with pytest.raises(ConfigError, match=r"is damaged \(RecursionError"):
        run_directory.read_json(str(tmp_path / "config.json"), "the run's settings")


def _plotted(monkeypatch):
    """`{png name: [y data of every line, axis by axis]}` of the figures `compare` saves."""
    plotted = {}
    save = compare._save

    def spy(fig, path):
        lines = [line.get_ydata() for ax in fig.axes for line in ax.get_lines()]
        plotted[os.path.basename(path)] = [[float(y) for y in ys] for ys in lines]
        save(fig, path)

    monkeypatch.setattr(compare, "_save", spy)
    return plotted


def test_plots_label_runs_by_directory_and_name_data_and_recipe(tmp_path, monkeypatch):
    """Two NAM seeds had one label ("nam"): each run is its directory now, the
    line styles have a legend, and the title names the data and the recipe."""
    texts = {}
    save = compare._save

    def spy(fig, path):
        legends = [[t.get_text() for t in leg.get_texts()] for leg in fig.legends]
        styles = [
            [t.get_text() for t in ax.get_legend().get_texts()]
            for ax in fig.axes
            if ax.get_legend()
        ]
        texts[os.path.basename(path)] = (fig.get_suptitle(), legends, styles)
        save(fig, path)

    monkeypatch.setattr(compare, "_save", spy)
    rows = [(0, 0.1, 0.2, 0.4, 50.0, 0.1, 0.3)]
    for name, data in (
        ("nam-seed0", "cifar100"),
        ("nam-seed1", "cifar100"),
        ("other", "synthetic"),
    ):
        write_run(tmp_path / name, "nam", rows, dataset=data)
    write_run(tmp_path / "elsewhere" / "nam-seed0", "baseline", rows)
    runs = [str(tmp_path / n) for n in ("nam-seed0", "nam-seed1", "elsewhere/nam-seed0")]
    compare.compare(runs, str(tmp_path / "out"))
    title, legends, styles = texts["accuracy.png"]
    assert title == "Accuracy per epoch: CIFAR-100, recipe official"
    assert legends == [[os.path.normpath(runs[0]), "nam-seed1", os.path.normpath(runs[2])]]
    assert styles == [["validation", "train"]] * 2
    assert texts["learning_rate.png"][1] == legends
    compare.compare([runs[1], str(tmp_path / "other")], str(tmp_path / "out"))
    assert texts["accuracy.png"][0].endswith(": CIFAR-100, synthetic data, recipe official")


def _gap(values):
    return all(math.isnan(v) for v in values)


HEADER = "epoch,lr,top1,top5,train_images_per_s,val_top1,val_top5"
DASH_CASES = {
    # log.csv text, the row's figures that are missing, the accuracy lines that are gaps
    "no top1 column": (
        "epoch,lr,top5\n0,0.1,0.4\n1,0.1,0.5\n",
        {"final_train_top1": None, "gap_top1": None, "best_val_top1": None},
        [0, 1, 3],
    ),
    "val_top1 without top1": (
        "epoch,lr,val_top1\n0,0.1,0.3\n1,0.1,0.35\n2,0.1,0.4\n",
        {"final_train_top1": None, "gap_top1": None, "final_val_top1": 0.4},
        [0, 2, 3],
    ),
    "NaN and inf figures": (
        f"{HEADER}\n0,nan,nan,inf,-inf,NaN,Infinity\n",
        {"final_train_top1": None, "best_val_top1": None, "train_images_per_s": None},
        [0, 1, 2, 3],
    ),
    "NA and empty cells": (
        f"{HEADER}\n0,,NA,,NA,, NA\n",
        {"final_train_top1": None, "best_val_top5": None, "final_val_top5": None},
        [0, 1, 2, 3],
    ),
}


@pytest.mark.parametrize("case", DASH_CASES, ids=list(DASH_CASES))
def test_a_missing_figure_is_a_dash_and_a_gap(case, tmp_path, monkeypatch, capsys):
    log, missing, gaps = DASH_CASES[case]
    write_run(tmp_path / "run", "nam", [])
    (tmp_path / "run" / "log.csv").write_text(log)
    plotted = _plotted(monkeypatch)
    assert compare.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "comparison.json").read_text())["runs"][0]
    assert {key: row[key] for key in missing} == missing
    assert "| run | nam | - | - |" in capsys.readouterr().out
    lines = plotted["accuracy.png"]  # train top-1, val top-1, train top-5, val top-5
    assert [i for i, ys in enumerate(lines) if _gap(ys)] == gaps


def test_non_finite_summary_figures_and_a_missing_lr_are_dashes_and_gaps(tmp_path, monkeypatch):
    write_run(tmp_path / "run", "nam", [], {"parameters": float("nan"), "multiply_adds": 1e400})
    (tmp_path / "run" / "log.csv").write_text("epoch,top1,nam_near_zero\n0,0.2,0.5\n1,0.3,0.6\n")
    plotted = _plotted(monkeypatch)
    (row,) = compare.compare([str(tmp_path / "run")], str(tmp_path / "out"))
    assert row["parameters"] is None and row["multiply_adds"] is None and not row["complete"]
    lr, near_zero, max_weight = plotted["learning_rate.png"]
    assert _gap(lr) and near_zero == [50.0, 60.0] and _gap(max_weight)
    assert "| run | nam | - | - | - | 2 |" in compare.markdown_table([row])


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
