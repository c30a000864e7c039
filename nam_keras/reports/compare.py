"""The comparison report: several training runs side by side.

    python -m nam_keras.reports.compare runs/nam runs/baseline runs/se --out comparison

reads each run directory that `train.py` wrote (`config.json`, `log.csv`,
`summary.json` when the run finished) and writes to `--out`:

- `accuracy.png`: train (dashed) and validation (solid) top-1 and top-5 per
  epoch for every run; the space between a run's two lines is its
  overfitting gap;
- `learning_rate.png`: the learning rate per epoch, and the NAM sparsity
  figures (near-zero channels, largest weight) where a run has them;
- `comparison.md` and `comparison.json`: per run the attention module,
  parameters, forward multiply-adds per image, training images/s, best and
  final validation top-1/top-5, and the train-validation top-1 gap.

Nothing in it needs TensorFlow: it reads files and draws.
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys

from nam_keras import cli, io
from nam_keras.errors import ConfigError
from nam_keras.training.run_directory import RunDirectory, read_json

PROG = "python -m nam_keras.reports.compare"
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


def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_log(path):
    """`log.csv` as `{column: [float or None per epoch]}` (`"epoch"` 1-based)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror or err})") from None
    if not rows:
        raise ConfigError(f"{path} has no epoch yet: nothing to compare")
    columns = {key: [_number(row.get(key)) for row in rows] for key in rows[0] if key}
    columns["epoch"] = [int(e) + 1 for e in columns.get("epoch", range(len(rows)))]
    return columns


def read_run(run_dir):
    """One run directory: its settings, its per-epoch log and its summary."""
    paths = RunDirectory(run_dir, output="")  # its file names only; nothing is opened
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir} is not a folder; expected a run directory of train.py")
    config = read_json(paths.config_json, "the run's settings")
    if config is None:
        raise ConfigError(f"{run_dir} has no config.json: not a run directory of train.py")
    summary = read_json(paths.summary_json, "the run's summary") or {}
    return {"dir": run_dir, "config": config, "log": read_log(paths.log_csv), "summary": summary}


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


def summarise(run):
    """The table row of one run (`None` where a figure is missing)."""
    log, summary, config = run["log"], run["summary"], run["config"]
    val_top1 = log.get("val_top1", [])
    last_val = max((i for i, v in enumerate(val_top1) if v is not None), default=None)
    train_at_val = log.get("top1", [None])[last_val] if last_val is not None else None
    final_val = val_top1[last_val] if last_val is not None else None
    return {
        "run": os.path.basename(os.path.normpath(run["dir"])),
        "attention": config.get("model"),
        "recipe": config.get("recipe", "default"),
        "parameters": summary.get("parameters"),
        "multiply_adds": summary.get("multiply_adds"),
        "train_images_per_s": _speed(log.get("train_images_per_s", [])),
        "epochs": len(log["epoch"]),
        "complete": bool(summary.get("complete")),
        "best_val_top1": _best(val_top1),
        "best_val_top5": _best(log.get("val_top5", [])),
        "final_val_top1": final_val,
        "final_val_top5": _last(log.get("val_top5", [])),
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
    """A legend label per run: the attention module, plus the folder when two share it."""
    names = [run["config"].get("model", "?") for run in runs]
    return [
        f"{name} ({os.path.basename(os.path.normpath(run['dir']))})"
        if names.count(name) > 1
        else name
        for name, run in zip(names, runs)
    ]


def _save(fig, path):
    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def plot_accuracy(runs, path):
    """Train (dashed) and validation (solid) top-1 and top-5 per epoch, every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for color, (label, run) in enumerate(zip(_labels(runs), runs)):
        log = run["log"]
        for ax, metric in zip(axes, ("top1", "top5")):
            style = {"color": f"C{color}", "lw": 1.5}
            ax.plot(log["epoch"], _percent(log.get(metric)), ls="--", **style)
            val = _percent(log.get(f"val_{metric}"))
            ax.plot(log["epoch"], val, ls="-", marker=".", ms=3, label=label, **style)
    for ax, title in zip(axes, ("top-1", "top-5")):
        ax.set_title(f"{title} accuracy: validation (solid), train (dashed)", fontsize=10)
        ax.set_ylabel("accuracy (%)")
        _style(ax)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _style(ax):
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _percent(values):
    return [float("nan") if v is None else 100 * v for v in values or []]


def plot_schedule(runs, path):
    """The learning rate per epoch, and the NAM sparsity figures where logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_nam = any("nam_near_zero" in run["log"] for run in runs)
    fig, axes = plt.subplots(1, 3 if has_nam else 1, figsize=(15 if has_nam else 6, 4.2))
    axes = list(axes) if has_nam else [axes]
    for color, (label, run) in enumerate(zip(_labels(runs), runs)):
        log, style = run["log"], {"color": f"C{color}", "label": label, "alpha": 0.8}
        axes[0].plot(log["epoch"], log.get("lr") or [float("nan")] * len(log["epoch"]), **style)
        if has_nam and "nam_near_zero" in log:
            axes[1].plot(log["epoch"], _percent(log["nam_near_zero"]), **style)
            axes[2].plot(log["epoch"], log["nam_max_weight"], **style)
    titles = ("learning rate (end of epoch)", "NAM channels near zero (%)", "NAM largest weight")
    ylabels = ("learning rate", "% of channels < 0.1 x uniform", "max weight / uniform")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        _style(ax)
    if has_nam:
        axes[1].set_ylim(bottom=0)
    fig.tight_layout()
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
