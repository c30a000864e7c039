"""Evaluate a trained model on the CIFAR-100 test set, report on NAM, export for TF Serving.

    python evaluate.py nam.keras                        # loss, top-1/top-5, worst classes, NAM report
    python evaluate.py nam.keras --json report.json --plots plots/
    python evaluate.py nam.keras --export export/nam    # SavedModel in export/nam/<next version>/
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    from nam_keras.trainer import add_data_arguments

    p = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="a .keras file written by train.py")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--json", metavar="FILE", help="write the full report (per-class accuracy, NAM weights) here")
    p.add_argument("--plots", metavar="DIR", help="write nam_weights.png (NAM channel weights per block) here")
    p.add_argument("--near-zero", type=float, default=0.1,
                   help="a NAM weight counts as near zero below this fraction of the uniform weight 1/C")
    p.add_argument("--export", metavar="DIR", help="also write a TF Serving SavedModel to DIR/<version>/")
    p.add_argument("--skip-eval", action="store_true", help="no test-set evaluation (report/export only)")
    p.add_argument("--seed", type=int, default=0, help="seed of --dataset synthetic")
    add_data_arguments(p)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1; received {args.batch_size}")
    if not 0 < args.near_zero <= 1:
        parser.error(f"--near-zero must be in (0, 1]; received {args.near_zero}")

    import nam_keras  # noqa: F401  (registers the custom objects)
    from nam_keras import evaluation
    from nam_keras.data import DataError
    from nam_keras.training import atomic_write_text

    try:
        model = evaluation.load_model(args.model)
        report = {"model": os.path.abspath(args.model), "name": model.name}
        if not args.skip_eval:
            report["test"] = _evaluate(model, args)
            t = report["test"]
            print(f"{model.name} on {t['examples']} test images: loss {t['loss']:.4f}, "
                  f"top-1 {t['top1']:.2%}, top-5 {t['top5']:.2%}")
            print("worst classes: " + ", ".join(
                f"{w['class']} {w['accuracy']:.0%}" for w in t["worst_classes"]))
        nam = evaluation.nam_report(model, args.near_zero)
        report["nam"] = nam
        if nam is None:
            print("NAM report: the model has no NAM layers (a baseline); nothing to report.")
        else:
            print(f"NAM report: {len(nam['layers'])} NAM layers, {nam['near_zero_channels']} of "
                  f"{nam['channels']} channels ({nam['near_zero_fraction']:.1%}) below "
                  f"{args.near_zero:g} x the uniform weight")
            for entry in nam["layers"]:
                ch = entry["channel"]
                r = ch["relative_to_uniform"]
                print(f"  {entry['layer']:<22} C={ch['size']:<5} near zero {ch['near_zero_fraction']:6.1%}"
                      f"   weight/uniform min {r['min']:.3f} median {r['median']:.3f} max {r['max']:.3f}")
            if args.plots:
                path = evaluation.plot_nam_report(nam, os.path.join(args.plots, "nam_weights.png"))
                print(f"NAM plot -> {path}")
        if args.export:
            path = evaluation.export_saved_model(model, args.export)
            report["export"] = path
            print(f"SavedModel for TF Serving -> {path} (signature serving_default: "
                  "images uint8 (N, 32, 32, 3) -> probabilities, top5_classes)")
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
            print(f"report -> {args.json}")
    except (evaluation.ModelError, DataError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    return 0


def _evaluate(model, args):
    import numpy as np
    import tensorflow as tf

    from nam_keras import data, evaluation
    from nam_keras.trainer import load_arrays

    images, labels = load_arrays(args)["test"]
    ds = data.eval_pipeline(tf.data.Dataset.from_tensor_slices((images, labels)), args.batch_size)
    logits = model.predict(ds, verbose=1)
    return evaluation.accuracy_report(np.asarray(logits, np.float32), labels)


if __name__ == "__main__":
    sys.exit(main())
