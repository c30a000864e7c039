"""Evaluate a trained model on the CIFAR-100 test set, report on NAM, export for TF Serving.

python evaluate.py nam.keras                        # loss, top-1/top-5, worst classes, NAM report
python evaluate.py nam.keras --json report.json --plots plots/
python evaluate.py nam.keras --export export/nam    # SavedModel in export/nam/<next version>/
"""

import json
import os
import sys

if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:  # set: the user wants TensorFlow's own logging
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # errors only
    os.environ["NAM_KERAS_QUIET_START"] = "1"  # and no start-up noise (nam_keras.console)

from nam_keras import cli
from nam_keras.config import EvalConfig

PROG = "evaluate.py"


def run(config):
    """Evaluates, reports and exports as `config` asks; prints as it goes."""
    import nam_keras  # noqa: F401  (registers the custom objects)
    from nam_keras.io import atomic_write_text, check_writable, make_folder
    from nam_keras.reports import evaluation
    from nam_keras.serving import export

    cli.start_quietly()
    # backend and paths first: a bad one must not cost the whole evaluation
    if config.export or config.export_tflite:
        export.check_backend()
    if config.export_tflite:
        check_writable(config.export_tflite, "a .tflite file path")
    if config.json:
        check_writable(config.json, "a .json file path")
    if config.plots:
        make_folder(config.plots)
        check_writable(os.path.join(config.plots, "nam_weights.png"), "a folder for plots")
    model = evaluation.load_model(config.model)
    report = {"model": os.path.abspath(config.model), "name": model.name}
    if not config.skip_eval:
        report["test"] = evaluation.evaluate_test_set(model, config)
        print("\n".join(evaluation.accuracy_lines(model.name, report["test"])))
    report["nam"] = evaluation.nam_report(model, config.near_zero)
    print("\n".join(evaluation.nam_lines(report["nam"], config.near_zero)))
    if config.plots and report["nam"] is not None:
        path = os.path.join(config.plots, "nam_weights.png")
        print(f"NAM plot -> {evaluation.plot_nam_report(report['nam'], path)}")
    if config.export:
        report["export"] = export.export_saved_model(model, config.export)
        print(
            f"SavedModel for TF Serving -> {report['export']} (signature serving_default: "
            "images uint8 (N, 32, 32, 3) -> probabilities, top5_classes)"
        )
    if config.export_tflite:
        report["export_tflite"] = export.export_tflite(
            model, config.export_tflite, config.tflite_quantize
        )
        print(
            f"LiteRT model -> {report['export_tflite']} (weights {config.tflite_quantize}; "
            "images uint8 (N, 32, 32, 3) -> probabilities)"
        )
    if config.json:
        atomic_write_text(config.json, json.dumps(report, indent=2) + "\n")
        print(f"report -> {config.json}")
    return report


def main(argv=None):
    """`evaluate.py` with `argv` (default `sys.argv[1:]`); returns the exit code."""
    config = cli.parse_config(EvalConfig, argv, PROG, __doc__.split("\n\n")[0])
    return cli.run_main(PROG, run, config)


if __name__ == "__main__":
    sys.exit(main())
