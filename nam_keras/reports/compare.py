"""The comparison report: several training runs side by side.

    python -m nam_keras.reports.compare runs/nam runs/baseline runs/se --out comparison

reads each run directory that `train.py` wrote (`config.json`, `log.csv`,
`summary.json` when the run finished) and writes to `--out`:

- `accuracy.png`: train (dashed) and validation (solid) top-1 and top-5 per
  epoch for every run, labelled by its run directory; the space between a
  run's two lines is its overfitting gap;
- `learning_rate.png`: the learning rate per epoch, and the NAM sparsity
  figures (near-zero channels, largest weight) where a run has them;
- `comparison.md` and `comparison.json`: per run the attention module,
  parameters, forward multiply-adds per image, training images/s, best and
  final validation top-1/top-5, and the train-validation top-1 gap.

A file that is not what train.py writes (damaged JSON or CSV, a list where a
number or a name belongs, rows that do not fit the header, an epoch that is
not a whole number) is a `ConfigError` naming the file; a figure that is merely
missing (a column the log lacks, NA, empty, NaN or infinite; no summary.json)
is a dash in the table and a gap in the plot.

Nothing in it needs TensorFlow: it reads files and draws.
"""

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys

from nam_keras import cli, io
from nam_keras.errors import ConfigError
from nam_keras.training.run_directory import RunDirectory

PROG = "python -m nam_keras.reports.compare"
#: How a message about a file the report cannot use ends.
NOT_OURS = ": not a file of train.py"
COLUMNS = (
    ("run", "run"),
    ("attention", "attention"),
    ("parameters", "parameters"),
    ("multiply_adds", "multiply-adds / image"),
    ("train_images_per_s", "train img/s"),
    ("epochs", "epochs"),
    ("best_val_top1", "best top-1"),
    ("best_val_top5", "best top-5"),
    ("final_val_top1", "final top-1"),
    ("final_val_top5", "final top-5"),
    ("final_train_top1", "train top-1"),
    ("gap_top1", "train - val top-1"),
)
COUNTS = ("parameters", "multiply_adds")  # the summary.json figures the table shows
SETTINGS = ("model", "recipe", "dataset")  # the config.json names the report shows
#: `--dataset` -> how the figures' titles name it
DATA_NAMES = {"cifar100": "CIFAR-100", "synthetic": "synthetic data"}


#: the `log.csv` columns the report reads; any other column is left alone.
FIGURES = ("lr", "top1", "top5", "val_top1", "val_top5", "train_images_per_s")
FIGURES += ("nam_near_zero", "nam_max_weight")
NOT_RUN = ("", "NA")  # Keras' CSVLogger writes NA for a figure it did not have that epoch
EPOCH = re.compile(r"[0-9]{1,9}")


def _show(value):
    """`repr(value)`, cut short for a message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _figure(path, line, key, text):
    """One `log.csv` cell: a float, `None` when missing or not finite; `ConfigError` for text."""
    if text.strip() in NOT_RUN:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{path}: line {line}: {key} {_show(text)} is not a number") from None
    return value if math.isfinite(value) else None


def _epoch(path, line, text):
    """One `log.csv` epoch (0-based there), 1-based; `ConfigError` unless a whole number."""
    if not EPOCH.fullmatch(text.strip()):
        raise ConfigError(f"{path}: line {line}: epoch {_show(text)} is not a whole number")
    return int(text) + 1


def _csv_lines(path):
    """`[(line number, fields)]` of `path`, blank lines left out; `ConfigError` when unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            return [(reader.line_num, row) for row in reader if row]
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: the run has no epoch yet") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}): damaged") from None
    except csv.Error as err:
        raise ConfigError(f"{path} is not a CSV log of train.py ({err})") from None


def _check_shape(path, header, body):
    """`ConfigError` unless `header` names `epoch` and each figure once and rows fit it."""
    if "epoch" not in header:
        raise ConfigError(f"{path} has no 'epoch' column: not a log of train.py")
    twice = [key for key in ("epoch", *FIGURES) if header.count(key) > 1]
    if twice:
        raise ConfigError(f"{path} names the column {twice[0]!r} twice: damaged")
    for line, row in body:
        if len(row) != len(header):
            raise ConfigError(
                f"{path}: line {line} has {len(row)} fields, the header {len(header)}: damaged"
            )


def read_log(path):
    """`log.csv` as `{column: [float or None per epoch]}`: `"epoch"` (1-based) and
    the `FIGURES` it has; a cell that is NA, empty, NaN or infinite is `None`."""
    lines = _csv_lines(path)
    if len(lines) < 2:
        raise ConfigError(f"{path} has no epoch yet: nothing to compare")
    (_, header), body = lines[0], lines[1:]
    header = [name.strip() for name in header]
    _check_shape(path, header, body)
    index = header.index("epoch")
    columns = {"epoch": [_epoch(path, line, row[index]) for line, row in body]}
    for key in (k for k in FIGURES if k in header):
        index = header.index(key)
        columns[key] = [_figure(path, line, key, row[index]) for line, row in body]
    return columns


def _name(path, config, key):
    """`config[key]`: a string, or `None` when absent; `ConfigError` for anything else."""
    value = config.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{path}: {key!r} is {_show(value)}, not a name as train.py writes")
    return value


def _as_float(value):
    """`float(value)` for a JSON number; `None` for a bool, text, a list, an int past floats."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _count(path, summary, key):
    """`summary[key]`: a number >= 0, `None` when absent or not finite; else `ConfigError`."""
    value = summary.get(key)
    number = _as_float(value)
    if value is None or (number is not None and not math.isfinite(number)):
        return None
    if number is None or number < 0:
        raise ConfigError(f"{path}: {key!r} is {_show(value)}, not a number >= 0")
    return value


def _complete(path, summary):
    """`summary["complete"]`: `True`/`False` (absent: `False`); `ConfigError` for anything else."""
    value = summary.get("complete", False)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: 'complete' is {_show(value)}, not true or false")
    return value


def read_run(run_dir):
    """One run directory: its settings, its per-epoch log and its summary, checked;
    `ConfigError` naming the file when one is not what train.py writes."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir} is not a folder; expected a run directory of train.py")
    paths = RunDirectory(run_dir, output="")  # its file names only; nothing is opened
    config = io.read_json_object(paths.config_json, advice=NOT_OURS)
    if config is None:
        raise ConfigError(f"{run_dir} has no config.json: not a run directory of train.py")
    settings = {key: _name(paths.config_json, config, key) for key in SETTINGS}
    summary = io.read_json_object(paths.summary_json, advice=NOT_OURS) or {}
    figures = {key: _count(paths.summary_json, summary, key) for key in COUNTS}
    figures["complete"] = _complete(paths.summary_json, summary)
    log = read_log(paths.log_csv)
    return {"dir": run_dir, "config": settings, "log": log, "summary": figures}


def _last(values):
    present = [v for v in values if v is not None]
    return present[-1] if present else None


def _best(values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _speed(values):
    """Median training images/s, the first (compiling) epoch left out when there are others."""
    present = [v for v in values if v is not None]
    if len(present) > 1:
        present = present[1:]
    return statistics.median(present) if present else None


def _column(log, key):
    """`log[key]`, or a `None` per epoch when the log has no such column."""
    return log.get(key) or [None] * len(log["epoch"])


def summarise(run):
    """The table row of one run (`None` where a figure is missing)."""
    log, summary, config = run["log"], run["summary"], run["config"]
    val_top1 = _column(log, "val_top1")
    last_val = max((i for i, v in enumerate(val_top1) if v is not None), default=None)
    train_at_val = _column(log, "top1")[last_val] if last_val is not None else None
    final_val = val_top1[last_val] if last_val is not None else None
    return {
        "run": os.path.basename(os.path.normpath(run["dir"])),
        "attention": config["model"],
        "recipe": config["recipe"] or "default",
        "parameters": summary["parameters"],
        "multiply_adds": summary["multiply_adds"],
        "train_images_per_s": _speed(_column(log, "train_images_per_s")),
        "epochs": len(log["epoch"]),
        "complete": summary["complete"],
        "best_val_top1": _best(val_top1),
        "best_val_top5": _best(_column(log, "val_top5")),
        "final_val_top1": final_val,
        "final_val_top5": _last(_column(log, "val_top5")),
        "final_train_top1": train_at_val,
        "gap_top1": None if final_val is None or train_at_val is None else train_at_val - final_val,
    }


def _cell(key, value):
    if value is None:
        return "-"
    if key == "parameters":
        return f"{int(value):,}"
    if key == "multiply_adds":
        return f"{value / 1e6:,.1f} M"
    if key == "train_images_per_s":
        return f"{value:,.1f}"
    if "top" in key:
        return f"{100 * value:.2f}%"
    return str(value)


def markdown_table(rows):
    """The rows as a Markdown table (percentages, millions)."""
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(key, row[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _labels(runs):
    """A legend label per run: its run directory's name (its path when two share a name)."""
    paths = [os.path.normpath(run["dir"]) for run in runs]
    names = [os.path.basename(p) for p in paths]
    return [name if names.count(name) == 1 else p for name, p in zip(names, paths)]


def _subtitle(runs):
    """What the runs were trained on and how: `"CIFAR-100, recipe official"`,
    every distinct value listed where the runs differ."""

    def distinct(key, default, names=None):
        values = [run["config"][key] or default for run in runs]
        return ", ".join((names or {}).get(v, v) for v in dict.fromkeys(values))

    recipes = distinct("recipe", "default")
    word = "recipes" if "," in recipes else "recipe"
    return f"{distinct('dataset', 'unknown data', DATA_NAMES)}, {word} {recipes}"


def _finish(fig, runs, handles, title):
    """The figure's title (with `_subtitle`) and one legend of the runs below the
    axes, `handles` a line of each run."""
    fig.suptitle(f"{title}: {_subtitle(runs)}", fontsize=11)
    fig.legend(
        handles,
        _labels(runs),
        loc="outside lower center",
        ncol=min(len(runs), 5),
        fontsize=8,
        title="run directory",
        title_fontsize=8,
    )


def _save(fig, path):
    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def plot_accuracy(runs, path):
    """Train (dashed) and validation (solid) top-1 and top-5 per epoch, every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), layout="constrained")
    handles = []
    for color, run in enumerate(runs):
        log = run["log"]
        for ax, metric in zip(axes, ("top1", "top5")):
            style = {"color": f"C{color}", "lw": 1.5}
            ax.plot(log["epoch"], _percent(_column(log, metric)), ls="--", **style)
            val = _percent(_column(log, f"val_{metric}"))
            (line,) = ax.plot(log["epoch"], val, ls="-", marker=".", ms=3, **style)
        handles.append(line)
    kinds = [Line2D([], [], color="gray", ls="-", marker=".", ms=3, label="validation")]
    kinds.append(Line2D([], [], color="gray", ls="--", label="train"))
    for ax, title in zip(axes, ("top-1", "top-5")):
        ax.set_title(f"{title} accuracy", fontsize=10)
        ax.set_ylabel("accuracy (%)")
        _style(ax)
        ax.legend(handles=kinds, fontsize=8)
    _finish(fig, runs, handles, "Accuracy per epoch")
    _save(fig, path)
    plt.close(fig)


def _style(ax):
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _percent(values):
    """Fractions as percentages, `None` as NaN (a gap in the line)."""
    return [float("nan") if v is None else 100 * v for v in values]


def _floats(values):
    """`None` as NaN (a gap in the line)."""
    return [float("nan") if v is None else v for v in values]


def plot_schedule(runs, path):
    """The learning rate per epoch, and the NAM sparsity figures where logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_nam = any("nam_near_zero" in run["log"] for run in runs)
    fig, axes = plt.subplots(
        1, 3 if has_nam else 1, figsize=(15 if has_nam else 7, 4.9), layout="constrained"
    )
    axes = list(axes) if has_nam else [axes]
    handles = []
    for color, run in enumerate(runs):
        log, style = run["log"], {"color": f"C{color}", "alpha": 0.8}
        handles += axes[0].plot(log["epoch"], _floats(_column(log, "lr")), **style)
        if has_nam and "nam_near_zero" in log:
            axes[1].plot(log["epoch"], _percent(log["nam_near_zero"]), **style)
            axes[2].plot(log["epoch"], _floats(_column(log, "nam_max_weight")), **style)
    titles = ("learning rate (end of epoch)", "NAM channels near zero (%)", "NAM largest weight")
    ylabels = ("learning rate", "% of channels < 0.1 x uniform", "max weight / uniform")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        _style(ax)
    if has_nam:
        axes[1].set_ylim(bottom=0)
    _finish(fig, runs, handles, "Schedule" + (" and NAM sparsity" if has_nam else ""))
    _save(fig, path)
    plt.close(fig)


def compare(run_dirs, out_dir):
    """Reads the runs and writes the two PNGs and the two tables into `out_dir`.

    Returns:
        The table rows (dicts), in the order of `run_dirs`.
    """
    if not run_dirs:
        raise ConfigError("no run directory given; expected one or more")
    runs = [read_run(d) for d in run_dirs]
    rows = [summarise(run) for run in runs]
    io.make_folder(out_dir)
    plot_accuracy(runs, os.path.join(out_dir, "accuracy.png"))
    plot_schedule(runs, os.path.join(out_dir, "learning_rate.png"))
    io.atomic_write_text(os.path.join(out_dir, "comparison.md"), markdown_table(rows))
    text = json.dumps({"runs": rows}, indent=2) + "\n"
    io.atomic_write_text(os.path.join(out_dir, "comparison.json"), text)
    return rows


def main(argv=None):
    """The command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", default="comparison", help="folder for the PNGs and tables")
    args = parser.parse_args(argv)

    def run():
        rows = compare(args.run_dirs, args.out)
        print(markdown_table(rows), end="")
        print(f"[nam-keras] figures and tables -> {args.out}/")

    return cli.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
