"""The training run behind `train.py`: data, model, `model.fit` with callbacks."""

import csv
import json
import os
import shutil
import sys
import time

import keras

from nam_keras import data, training
from nam_keras.resnet import build_resnet

# Settings that must match for a backup to be resumed.
RESUME_KEYS = ("model", "depth", "width", "stem", "spatial", "sparsity", "stop_gradient",
               "num_classes", "precision", "mixing")


def add_data_arguments(parser):
    """The data options shared by train.py and evaluate.py."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=data.SOURCES, default="cifar100",
                       help="cifar100 (TFDS, or the local archive given by --data-dir) or "
                            "synthetic random data of the same shapes (default: cifar100)")
    group.add_argument("--data-dir", metavar="PATH",
                       help="local cifar-100-python.tar.gz, its folder, or the extracted "
                            "cifar-100-python/ folder; used instead of TFDS")
    group.add_argument("--tfds-data-dir", metavar="DIR",
                       help="TensorFlow Datasets folder (default ~/tensorflow_datasets)")
    group.add_argument("--synthetic-size", type=int, nargs=2, default=(50_000, 10_000),
                       metavar=("TRAIN", "TEST"),
                       help="number of train and test examples of --dataset synthetic")
    return group


def load_arrays(args):
    return data.load_cifar100_arrays(
        args.dataset, data_dir=args.data_dir, tfds_data_dir=args.tfds_data_dir,
        synthetic_sizes=tuple(args.synthetic_size), seed=args.seed,
    )


def log(message):
    print(f"[nam-keras] {message}", flush=True)


def _read_backup_epoch(backup_dir):
    for name in ("training_metadata.json", "training_metadata.json.bkp"):
        path = os.path.join(backup_dir, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    return int(json.load(f)["epoch"])
            except (ValueError, KeyError, OSError):
                continue
    return None


def _truncate_csv(path, first_epoch):
    """Keeps the CSV rows of epochs before `first_epoch` (those the backup holds)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < first_epoch]
    training.atomic_write_text(path, "".join(",".join(r) + "\n" for r in kept))


def _device_summary(gpus):
    if gpus:
        return f"{len(gpus)} GPU(s)"
    return f"CPU ({os.cpu_count()} cores)"


def _strategy_name(strategy):
    name = type(strategy).__name__
    if name.startswith("_Default"):
        return "one device"
    return {"CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy"}.get(name, name)


def train(args):
    """Runs one training job described by the parsed `train.py` arguments.

    Returns the process exit code (0 on success).
    """
    import tensorflow as tf

    started = time.time()
    keras.utils.set_random_seed(args.seed)
    strategy = training.make_strategy(args.cpu_replicas)
    gpus = tf.config.list_physical_devices("GPU")
    precision = training.resolve_precision(args.precision, gpus)
    jit = training.resolve_jit(args.jit_compile, gpus)
    replicas = strategy.num_replicas_in_sync
    if args.batch_size % replicas:
        raise training.ConfigError(
            f"--batch-size {args.batch_size} (the global batch) is not divisible by the "
            f"{replicas} replicas of {_strategy_name(strategy)}."
        )
    keras.mixed_precision.set_global_policy(precision)
    sync_bn = replicas > 1 if args.sync_bn is None else args.sync_bn

    model_kind = "baseline" if args.baseline else "nam"
    run_dir = args.run_dir or os.path.join("runs", model_kind)
    output = args.output or f"{model_kind}.keras"
    training.check_writable(output)
    os.makedirs(run_dir, exist_ok=True)
    backup_dir = os.path.join(run_dir, "backup")
    csv_path = os.path.join(run_dir, "log.csv")
    config_path = os.path.join(run_dir, "config.json")
    mixing = bool(args.mixup or args.cutmix)

    lr = args.lr * (args.batch_size / 128 if args.lr_scaling == "linear" else 1.0)
    arrays = load_arrays(args)
    # train_pipeline refuses a batch larger than the training split (DataError).
    train_ds = data.train_pipeline(
        tf.data.Dataset.from_tensor_slices(arrays["train"]), args.batch_size, seed=args.seed,
        augment=not args.no_augment, randaugment=args.randaugment, mixup=args.mixup,
        cutmix=args.cutmix, repeat=True,
    )
    val_ds = None
    if args.val_freq:
        val_ds = data.eval_pipeline(
            tf.data.Dataset.from_tensor_slices(arrays["test"]), args.batch_size,
            one_hot=data.NUM_CLASSES if mixing else None,
        )

    n_train = len(arrays["train"][1])
    steps_per_epoch = args.steps_per_epoch or n_train // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    config = {
        **{k: v for k, v in vars(args).items() if k not in ("nam", "baseline")},
        "model": model_kind, "num_classes": data.NUM_CLASSES, "run_dir": run_dir,
        "output": output, "precision": precision, "jit_compile": jit,
        "strategy": _strategy_name(strategy), "replicas": replicas, "sync_bn": sync_bn,
        "per_replica_batch": args.batch_size // replicas, "peak_lr": lr,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "train_examples": n_train, "mixing": mixing,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }

    # ---- resume or start afresh
    resumed_epoch = None
    if not args.resume and os.path.exists(backup_dir):
        shutil.rmtree(backup_dir)
        if os.path.exists(csv_path):
            os.remove(csv_path)
    elif os.path.exists(backup_dir):
        resumed_epoch = _read_backup_epoch(backup_dir)
        if os.path.exists(config_path):
            with open(config_path) as f:
                old = json.load(f)
            changed = {k: (old.get(k), config[k]) for k in RESUME_KEYS if old.get(k) != config[k]}
            if changed:
                raise training.ConfigError(
                    f"{run_dir} holds a backup of a different run ({changed}, as "
                    "(saved, now)); pass --no-resume to start afresh or choose another --run-dir."
                )
    training.atomic_write_text(config_path, json.dumps(config, indent=2, default=str) + "\n")

    log(f"device: {_device_summary(gpus)}; strategy {_strategy_name(strategy)} with "
        f"{replicas} replica(s); precision {precision}; XLA {'on' if jit else 'off'}"
        + ("; synchronised BN" if sync_bn else ""))
    log(f"global batch {args.batch_size} ({args.batch_size // replicas} per replica); "
        f"peak LR {lr:g} (--lr {args.lr:g} for batch 128, scaling {args.lr_scaling}); "
        f"{args.epochs} epochs x {steps_per_epoch} steps = {total_steps} steps, "
        f"warmup {args.warmup_steps}")
    if args.warmup_steps >= total_steps:
        log(f"warning: --warmup-steps {args.warmup_steps} >= {total_steps} total steps: "
            "the learning rate never reaches its peak")
    if resumed_epoch is not None:
        log(f"resuming from the backup in {backup_dir}: {resumed_epoch} of {args.epochs} "
            "epochs done")
        _truncate_csv(csv_path, resumed_epoch)

    with strategy.scope():
        model = build_resnet(
            depth=args.depth, num_classes=data.NUM_CLASSES,
            attention=None if args.baseline else "nam", stem=args.stem, width=args.width,
            sync_bn=sync_bn,
            attention_kwargs=None if args.baseline else {
                "spatial": args.spatial, "sparsity": args.sparsity,
                "stop_gradient": args.stop_gradient},
        )
        optimizer = training.TorchSGD(learning_rate=0.0, momentum=args.momentum,
                                      l2=args.weight_decay)
        if mixing:
            loss = keras.losses.CategoricalCrossentropy(from_logits=True)
            metrics = [keras.metrics.CategoricalAccuracy(name="top1"),
                       keras.metrics.TopKCategoricalAccuracy(5, name="top5")]
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            metrics = [keras.metrics.SparseCategoricalAccuracy(name="top1"),
                       keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")]
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit)

    callbacks = [
        training.WarmupCosine(lr, total_steps, args.warmup_steps),
        training.StopOnNonFiniteLoss(),
        keras.callbacks.CSVLogger(csv_path, append=resumed_epoch is not None),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard")),
        keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True,
                                         delete_checkpoint=False),
    ]
    try:
        history = model.fit(
            train_ds, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
            validation_data=val_ds, validation_steps=args.val_steps,
            validation_freq=args.val_freq or 1, callbacks=callbacks, verbose=args.verbose,
            shuffle=False,  # the pipeline shuffles, seeded, every epoch
        )
    except training.NonFiniteLossError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1

    training.save_model_atomic(model, output)
    shutil.rmtree(backup_dir, ignore_errors=True)  # only once the model is safe
    logs = {k: v[-1] for k, v in history.history.items()}
    summary = {
        "output": output, "epochs": args.epochs, "seconds": round(time.time() - started, 1),
        **{k: float(v) for k, v in logs.items()},
    }
    training.atomic_write_text(os.path.join(run_dir, "summary.json"),
                               json.dumps(summary, indent=2) + "\n")
    val = (f"val top-1 {logs['val_top1']:.2%}, top-5 {logs['val_top5']:.2%}"
           if "val_top1" in logs else "no validation")
    log(f"done: {model.name}, {args.epochs} epochs in {summary['seconds']:.0f} s; "
        f"train loss {logs['loss']:.4f}, {val}; model -> {output}")
    return 0
