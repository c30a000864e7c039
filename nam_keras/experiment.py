"""One training run, as `train.py` runs it, in short steps that take a `TrainConfig`.

    from nam_keras.config import TrainConfig
    from nam_keras.experiment import train
    result = train(TrainConfig(dataset="synthetic", depth=18, width=8, epochs=1))

`train` sets up the devices, prepares the run directory (resuming a backup),
builds and compiles the model, fits it with the callbacks and saves it. The
steps raise `ConfigError`, `DataError` or `NonFiniteLossError`; progress goes to
the `"nam_keras"` logger, which only the command lines print.
"""

import csv
import dataclasses
import json
import logging
import os
import shutil
import time

import keras

from nam_keras import callbacks, data, distribute, io
from nam_keras import config as settings
from nam_keras.errors import ConfigError
from nam_keras.optimizers import TorchSGD
from nam_keras.resnet import build_resnet

logger = logging.getLogger("nam_keras")


@dataclasses.dataclass(frozen=True)
class Devices:
    """Where and how the run computes."""

    strategy: object
    gpus: list
    precision: str
    jit_compile: bool
    replicas: int
    sync_bn: bool


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The files of one run."""

    run_dir: str
    output: str

    @property
    def backup(self):
        return os.path.join(self.run_dir, "backup")

    @property
    def log_csv(self):
        return os.path.join(self.run_dir, "log.csv")

    @property
    def config_json(self):
        return os.path.join(self.run_dir, "config.json")

    @property
    def summary_json(self):
        return os.path.join(self.run_dir, "summary.json")

    @property
    def tensorboard(self):
        return os.path.join(self.run_dir, "tensorboard")


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the trained model, the last epoch's logs, the summary."""

    model: keras.Model
    logs: dict
    summary: dict


# ------------------------------------------------------------------ steps


def set_up_devices(config):
    """Seeds, strategy, precision policy and XLA for this process."""
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    strategy = distribute.make_strategy(config.cpu_replicas)
    gpus = tf.config.list_physical_devices("GPU")
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(
            f"--batch-size {config.batch_size} (the global batch) is not divisible by the "
            f"{replicas} replicas of {distribute.strategy_name(strategy)}."
        )
    precision = distribute.resolve_precision(config.precision, gpus)
    keras.mixed_precision.set_global_policy(precision)
    return Devices(
        strategy=strategy,
        gpus=gpus,
        precision=precision,
        jit_compile=distribute.resolve_jit(config.jit_compile, gpus),
        replicas=replicas,
        sync_bn=replicas > 1 if config.sync_bn is None else config.sync_bn,
    )


def load_datasets(config):
    """`(train batches repeated forever, validation batches or None, train size)`."""
    import tensorflow as tf

    arrays = data.load_for(config)
    # train_pipeline refuses a batch larger than the training split (DataError).
    train_ds = data.train_pipeline(
        tf.data.Dataset.from_tensor_slices(arrays["train"]),
        config.batch_size,
        seed=config.seed,
        augment=not config.no_augment,
        randaugment=config.randaugment,
        mixup=config.mixup,
        cutmix=config.cutmix,
        repeat=True,
    )
    val_ds = None
    if config.val_freq:
        val_ds = data.eval_pipeline(
            tf.data.Dataset.from_tensor_slices(arrays["test"]),
            config.batch_size,
            one_hot=data.NUM_CLASSES if config.mixing else None,
        )
    return train_ds, val_ds, len(arrays["train"][1])


def resolved_config(config, devices, paths, n_train):
    """What `config.json` records: every setting plus what was resolved."""
    import tensorflow as tf

    steps_per_epoch = config.steps_per_epoch or n_train // config.batch_size
    return {
        **settings.to_dict(config),
        "precision": devices.precision,
        "jit_compile": devices.jit_compile,
        "num_classes": data.NUM_CLASSES,
        "run_dir": paths.run_dir,
        "output": paths.output,
        "strategy": distribute.strategy_name(devices.strategy),
        "replicas": devices.replicas,
        "sync_bn": devices.sync_bn,
        "per_replica_batch": config.batch_size // devices.replicas,
        "peak_lr": config.peak_lr,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * config.epochs,
        "train_examples": n_train,
        "mixing": config.mixing,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


def read_backup_epoch(backup_dir):
    """Epochs completed according to the backup's metadata, or `None`."""
    for name in ("training_metadata.json", "training_metadata.json.bkp"):
        path = os.path.join(backup_dir, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    return int(json.load(f)["epoch"])
            except (ValueError, KeyError, OSError):
                continue
    return None


def truncate_csv(path, first_epoch):
    """Keeps the CSV rows of epochs before `first_epoch` (those the backup holds)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < first_epoch]
    io.atomic_write_text(path, "".join(",".join(r) + "\n" for r in kept))


def check_resumable(paths, resolved):
    """Refuses a backup made by a run with other `RESUME_KEYS` settings."""
    if not os.path.exists(paths.config_json):
        return
    with open(paths.config_json) as f:
        old = json.load(f)
    changed = {
        k: (old.get(k), resolved[k]) for k in settings.RESUME_KEYS if old.get(k) != resolved[k]
    }
    if changed:
        raise ConfigError(
            f"{paths.run_dir} holds a backup of a different run ({changed}, as "
            "(saved, now)); pass --no-resume to start afresh or choose another --run-dir."
        )


def prepare_run_dir(config, paths, resolved):
    """Creates the run directory, writes `config.json`, and decides on resuming.

    Returns:
        The number of epochs a backup holds when the run resumes, else `None`.
    """
    os.makedirs(paths.run_dir, exist_ok=True)
    resumed_epoch = None
    if not config.resume and os.path.exists(paths.backup):
        shutil.rmtree(paths.backup)
        if os.path.exists(paths.log_csv):
            os.remove(paths.log_csv)
    elif os.path.exists(paths.backup):
        resumed_epoch = read_backup_epoch(paths.backup)
        check_resumable(paths, resolved)
    io.atomic_write_text(paths.config_json, json.dumps(resolved, indent=2, default=str) + "\n")
    if resumed_epoch is not None:
        truncate_csv(paths.log_csv, resumed_epoch)
    return resumed_epoch


def build_and_compile(config, devices):
    """The ResNet of `config`, compiled with the recipe's loss, optimizer and metrics."""
    with devices.strategy.scope():
        nam = config.model == "nam"
        model = build_resnet(
            depth=config.depth,
            num_classes=data.NUM_CLASSES,
            attention="nam" if nam else None,
            stem=config.stem,
            width=config.width,
            sync_bn=devices.sync_bn,
            attention_kwargs={
                "spatial": config.spatial,
                "sparsity": config.sparsity,
                "stop_gradient": config.stop_gradient,
            }
            if nam
            else None,
        )
        optimizer = TorchSGD(learning_rate=0.0, momentum=config.momentum, l2=config.weight_decay)
        if config.mixing:
            loss = keras.losses.CategoricalCrossentropy(from_logits=True)
            metrics = [
                keras.metrics.CategoricalAccuracy(name="top1"),
                keras.metrics.TopKCategoricalAccuracy(5, name="top5"),
            ]
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            metrics = [
                keras.metrics.SparseCategoricalAccuracy(name="top1"),
                keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5"),
            ]
        model.compile(
            optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=devices.jit_compile
        )
    return model


def make_callbacks(config, paths, total_steps, resuming):
    """Schedule, NaN stop, CSV and TensorBoard logs, and the per-epoch backup."""
    return [
        callbacks.WarmupCosine(config.peak_lr, total_steps, config.warmup_steps),
        callbacks.StopOnNonFiniteLoss(),
        keras.callbacks.CSVLogger(paths.log_csv, append=resuming),
        keras.callbacks.TensorBoard(paths.tensorboard),
        keras.callbacks.BackupAndRestore(
            paths.backup, double_checkpoint=True, delete_checkpoint=False
        ),
    ]


def save_outputs(model, history, config, paths, started):
    """Writes the final model (atomically), then drops the backup, then the summary."""
    io.save_model_atomic(model, paths.output)
    shutil.rmtree(paths.backup, ignore_errors=True)  # only once the model is safe
    logs = {k: float(v[-1]) for k, v in history.history.items()}
    summary = {
        "output": paths.output,
        "epochs": config.epochs,
        "seconds": round(time.time() - started, 1),
        **logs,
    }
    io.atomic_write_text(paths.summary_json, json.dumps(summary, indent=2) + "\n")
    return logs, summary


def _log_start(config, devices, resolved, resumed_epoch, backup):
    sync = "; synchronised BN" if devices.sync_bn else ""
    logger.info(
        f"device: {distribute.device_summary(devices.gpus)}; strategy {resolved['strategy']} "
        f"with {devices.replicas} replica(s); precision {devices.precision}; XLA "
        f"{'on' if devices.jit_compile else 'off'}{sync}"
    )
    total = resolved["total_steps"]
    logger.info(
        f"global batch {config.batch_size} ({resolved['per_replica_batch']} per replica); "
        f"peak LR {config.peak_lr:g} (--lr {config.lr:g} for batch 128, scaling "
        f"{config.lr_scaling}); {config.epochs} epochs x {resolved['steps_per_epoch']} steps = "
        f"{total} steps, warmup {config.warmup_steps}"
    )
    if config.warmup_steps >= total:
        logger.info(
            f"warning: --warmup-steps {config.warmup_steps} >= {total} total steps: "
            "the learning rate never reaches its peak"
        )
    if resumed_epoch is not None:
        logger.info(
            f"resuming from the backup in {backup}: {resumed_epoch} of {config.epochs} epochs done"
        )


def _log_done(model, config, logs, summary):
    val = (
        f"val top-1 {logs['val_top1']:.2%}, top-5 {logs['val_top5']:.2%}"
        if "val_top1" in logs
        else "no validation"
    )
    logger.info(
        f"done: {model.name}, {config.epochs} epochs in {summary['seconds']:.0f} s; "
        f"train loss {logs['loss']:.4f}, {val}; model -> {summary['output']}"
    )


# ------------------------------------------------------------------ the run


def train(config):
    """Runs the training job described by a `TrainConfig`.

    Args:
        config: a `nam_keras.config.TrainConfig`.

    Returns:
        A `TrainResult` with the trained model, the last epoch's logs and
        the summary written to the run directory.

    Raises:
        ConfigError: settings, paths or a backup that cannot work.
        DataError: the data source is missing or malformed.
        NonFiniteLossError: the loss became NaN/inf (the last backup is kept).
    """
    started = time.time()
    devices = set_up_devices(config)
    paths = RunPaths(run_dir=config.resolved_run_dir, output=config.resolved_output)
    io.check_writable(paths.output)
    train_ds, val_ds, n_train = load_datasets(config)
    resolved = resolved_config(config, devices, paths, n_train)
    resumed_epoch = prepare_run_dir(config, paths, resolved)
    _log_start(config, devices, resolved, resumed_epoch, paths.backup)
    model = build_and_compile(config, devices)
    history = model.fit(
        train_ds,
        epochs=config.epochs,
        steps_per_epoch=resolved["steps_per_epoch"],
        validation_data=val_ds,
        validation_steps=config.val_steps,
        validation_freq=config.val_freq or 1,
        verbose=config.verbose,
        callbacks=make_callbacks(config, paths, resolved["total_steps"], resumed_epoch is not None),
        shuffle=False,  # the pipeline shuffles, seeded, every epoch
    )
    logs, summary = save_outputs(model, history, config, paths, started)
    _log_done(model, config, logs, summary)
    return TrainResult(model=model, logs=logs, summary=summary)
