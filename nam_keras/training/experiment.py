"""One training run, as `train.py` runs it, in short steps that take a `TrainConfig`.

    from nam_keras.config import TrainConfig
    from nam_keras.training.experiment import train
    result = train(TrainConfig(dataset="synthetic", depth=18, width=8, epochs=1))

`train` sets up the devices, prepares the run directory (resuming a backup),
builds and compiles the model, fits it with the callbacks and saves it. The
steps raise `ConfigError`, `DataError` or `NonFiniteLossError`, naming the
`TrainConfig` arguments (`resume=False`; `train.py` writes them as flags);
progress goes to the `"nam_keras"` logger, which `train` prints while it runs
when `config.verbose` is not 0 and no logging is set up.
"""

import contextlib
import dataclasses
import logging
import os
import time

import keras
from keras import ops

from nam_keras import cifar100, cli, console
from nam_keras import config as settings
from nam_keras.data import device_input, sources
from nam_keras.errors import ConfigError
from nam_keras.models.resnet import build_resnet, forward_multiply_adds, weights_by_name
from nam_keras.training import callbacks, distribute, schedules
from nam_keras.training.optimizers import TorchSGD
from nam_keras.training.run_directory import RunDirectory
from nam_keras.training.trainer import CrossEntropyModel

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
    input: str  # "host" (tf.data) or "device" (device_input)
    reason: str = ""  # why `input` was chosen, when `--input auto` chose it


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the trained model, the last epoch's logs, the summary."""

    model: keras.Model
    logs: dict
    summary: dict


# ------------------------------------------------------------------ steps


def set_up_devices(config):
    """Seeds, strategy, precision policy and XLA for this process, for the
    Keras backend in use (`tf.distribute` only on TensorFlow). The precision
    is given to the network explicitly; no global policy is set."""
    backend = distribute.backend()
    distribute.check_backend_supports(
        config.cpu_replicas, config.sync_bn, os.environ.get("TF_CONFIG")
    )
    strategy = distribute.make_strategy(config.cpu_replicas, config.cluster_timeout)
    keras.utils.set_random_seed(config.seed)  # after: on JAX it starts the devices
    gpus = distribute.accelerators()
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(
            f"`batch_size={config.batch_size}` (the global batch) is not divisible by the "
            f"{replicas} replicas of {distribute.strategy_name(strategy)}."
        )
    jit_compile = distribute.resolve_jit(config.jit_compile, gpus, backend)
    input_kind, reason = distribute.resolve_input(
        config.input, config.randaugment, replicas, xla_mixing=jit_compile and config.mixing
    )
    return Devices(
        strategy=strategy,
        gpus=gpus,
        precision=distribute.resolve_precision(config.precision, gpus, backend),
        jit_compile=jit_compile,
        replicas=replicas,
        sync_bn=replicas > 1 if config.sync_bn is None else config.sync_bn,
        input=input_kind,
        reason=reason,
    )


def load_datasets(config, devices):
    """`(training arrays (images, labels), validation data or None)`; the
    training batches are made by `train_batches` once the first step is known.
    The validation data: `tf.data` batches for the host input, the arrays
    `(images, labels)` for the device input (no TensorFlow)."""
    arrays = sources.load_for(config)
    sources.check_batch_size(config.batch_size, len(arrays["train"][1]))
    if not config.val_freq:
        return arrays["train"], None
    _check_validation_batches(config, devices, len(arrays["test"][1]))
    one_hot = cifar100.NUM_CLASSES if config.one_hot else None
    if devices.input == "device":
        images, labels = arrays["test"]
        if one_hot:
            labels = device_input.one_hot(labels, one_hot)
        return arrays["train"], (images, labels)
    with console.quiet_startup(enabled=console.quiet_by_default()):  # CUDA's probing
        import tensorflow as tf

        if distribute.backend() != "tensorflow":  # tf.data only: the GPUs stay the backend's
            with contextlib.suppress(RuntimeError):  # TensorFlow already started: too late
                tf.config.set_visible_devices([], "GPU")
    from nam_keras.data import pipeline

    ds = tf.data.Dataset.from_tensor_slices(arrays["test"])
    return arrays["train"], pipeline.eval_pipeline(ds, config.batch_size, one_hot=one_hot)


def _check_validation_batches(config, devices, n_test):
    """`ConfigError` when the last validation batch cannot be split over the
    devices of `keras.distribution` (`tf.distribute` takes any batch)."""
    if not isinstance(devices.strategy, distribute.JaxDataParallel):
        return
    batch, replicas = config.batch_size, devices.replicas
    seen = n_test if config.val_steps is None else min(n_test, config.val_steps * batch)
    if seen % batch % replicas:
        raise ConfigError(
            f"validation: the {n_test} test examples in batches of `batch_size={batch}` end "
            f"with a batch of {seen % batch}, which does not split over the {replicas} "
            f"devices. Pass `val_steps={seen // batch}` (the full batches), a `batch_size` "
            f"whose remainder divides by {replicas}, or `val_freq=0`."
        )


def train_batches(config, devices, train_arrays, start_step=0):
    """The endless training batches from global step `start_step` on: batch `s`
    is a function of `(config.seed, s)`: `pipeline.train_pipeline` (host) or
    `device_input.TrainingBatches` (device: uint8, augmented in the train step)."""
    if devices.input == "device":
        index, count = distribute.process_of()
        return device_input.TrainingBatches(
            *train_arrays,
            config.batch_size,
            seed=config.seed,
            start_step=start_step,
            num_classes=cifar100.NUM_CLASSES,
            one_hot=config.one_hot,
            process_index=index,
            process_count=count,
        )
    from nam_keras.data import pipeline

    return pipeline.train_pipeline(
        train_arrays,
        config.batch_size,
        seed=config.seed,
        augment=config.augment,
        randaugment=config.randaugment,
        mixup=config.mixup,
        cutmix=config.cutmix,
        repeat=True,
        one_hot=config.one_hot,
        start_step=start_step,
    )


def _versions():
    """The versions of Keras, its backend and TensorFlow (when installed) for `config.json`."""
    import importlib.metadata

    versions = {"keras": keras.__version__}
    for package in ("tensorflow", distribute.backend()):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def resolved_config(config, devices, n_train):
    """What `config.json` records: every setting plus what was resolved."""
    steps_per_epoch = config.steps_per_epoch or n_train // config.batch_size
    return {
        **settings.to_dict(config),
        "precision": devices.precision,
        "jit_compile": devices.jit_compile,
        "num_classes": cifar100.NUM_CLASSES,
        "run_dir": config.resolved_run_dir,
        "output": config.resolved_output,
        "strategy": distribute.strategy_name(devices.strategy),
        "replicas": devices.replicas,
        "sync_bn": devices.sync_bn,
        "input": devices.input,
        "per_replica_batch": config.batch_size // devices.replicas,
        "peak_lr": config.peak_lr,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * config.epochs,
        "train_examples": n_train,
        "mixing": config.mixing,
        "backend": distribute.backend(),
        "versions": _versions(),
    }


def build_and_compile(config, devices):
    """The ResNet of `config` as a `CrossEntropyModel`, compiled with the recipe's
    loss, optimizer and metrics: its `loss` is the cross-entropy, NAM's penalty
    (trained as well) is logged as `sparsity_penalty`."""
    with devices.strategy.scope():
        network = build_resnet(
            depth=config.depth,
            num_classes=cifar100.NUM_CLASSES,
            attention=None if config.model == "baseline" else config.model,
            stem=config.stem,
            width=config.width,
            # on JAX the statistics are the global batch's without it (distribute.JaxDataParallel)
            sync_bn=devices.sync_bn and distribute.backend() == "tensorflow",
            attention_kwargs=config.attention_kwargs or None,
            dtype=devices.precision,
            fuse_attention=config.fuse_attention,
        )
        model = CrossEntropyModel.wrap(network)  # `loss` is the cross-entropy (trainer.py)
        optimizer = TorchSGD(
            learning_rate=0.0,
            momentum=config.momentum,
            l2=config.weight_decay,
            use_ema=config.ema > 0,
            ema_momentum=config.ema or 0.99,
        )
        if devices.precision == "mixed_float16":  # float16 gradients need loss scaling
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        if config.one_hot:
            loss = keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=config.label_smoothing
            )
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
    if devices.input == "device":  # augmented inside the compiled train step
        model.batch_maker = device_input.DeviceAugmentation(
            config.seed, config.augment, config.mixup, config.cutmix
        )
    return model


def _check_initial_checkpoint(path):
    if path is not None and not os.path.isfile(path):
        raise ConfigError(
            f"`initial_checkpoint={path}`: no such file; expected a .keras file written by "
            "train.py."
        )


def warm_start(model, path):
    """Loads the weights of the trained `.keras` file `path` into `model` (the
    same network: names and shapes must match); the optimizer is left as it is."""
    try:
        trained = keras.models.load_model(path)
    except Exception as err:
        raise ConfigError(
            f"`initial_checkpoint={path}` cannot be loaded ({type(err).__name__}: {err}); "
            "expected a .keras file written by train.py."
        ) from None
    # by name, so that a file whose NAM is fused differently (0.3's BN, then NAM) loads too
    targets, sources = weights_by_name(model), weights_by_name(trained)
    want = sorted((name, tuple(w.shape)) for name, w in targets.items())
    got = sorted((name, tuple(w.shape)) for name, w in sources.items())
    if want != got:
        diff = next(((g, w) for g, w in zip(got, want) if g != w), (len(got), len(want)))
        raise ConfigError(
            f"`initial_checkpoint={path}` holds {trained.name} ({len(got)} weights), not the "
            f"network of this run, {model.name} ({len(want)} weights); first difference (file, "
            f"run): {diff}. Expected a model with the same `model`, `depth`, `width` and "
            "`stem`."
        )
    for name, var in targets.items():
        var.assign(sources[name])
    logger.info(f"starting from the weights of {path} ({trained.name}); the optimizer is fresh")


def schedule_callback(config, steps_per_epoch):
    """The learning-rate callback of `config.schedule`."""
    return schedules.for_run(
        config.schedule,
        config.peak_lr,
        steps_per_epoch,
        config.epochs,
        config.warmup_steps,
        milestones=config.milestones,
        decay=config.lr_decay,
    )


def _quick_run_hint(config, devices):
    """A pointer at a smaller network when the full one trains on a CPU."""
    if devices.gpus or config.depth < 50 or config.width < 64:
        return None
    return "on a CPU, try --depth 18 --width 16 for a quick run"


def make_callbacks(config, devices, run, steps_per_epoch):
    """Schedule, speed and NAM figures (logged), validation on the EMA
    weights, NaN stop, clean stop on signals, the logs, then the run
    directory's restore and per-epoch backup (which holds the raw weights and,
    in the optimizer, their EMA): each epoch's log row is written before its
    backup, and the log opens only after the restore has trimmed it."""
    ema = [keras.callbacks.SwapEMAWeights(swap_on_epoch=False)] if config.ema else []
    return [
        *ema,
        schedule_callback(config, steps_per_epoch),
        callbacks.TrainingSpeed(config.batch_size),
        callbacks.EpochTimeEstimate(steps_per_epoch, hint=_quick_run_hint(config, devices)),
        callbacks.NAMSparsity(),
        callbacks.StopOnNonFiniteLoss(),
        callbacks.StopOnSignal(),
        run.csv_logger(),
        *([callbacks.TensorBoard(run.tensorboard)] if distribute.tensorflow_installed() else []),
        run.best_checkpoint(),
        run.callback(steps_per_epoch, config.epochs, scope=devices.strategy.scope),
    ]


def run_summary(model, config, started):
    """The figures of a finished run for `summary.json` (the last epoch's logs are added)."""
    return {
        "epochs": config.epochs,
        "optimizer_steps": int(ops.convert_to_numpy(model.optimizer.iterations)),
        "parameters": model.count_params(),
        "multiply_adds": forward_multiply_adds(model),
        "seconds": round(time.time() - started, 1),
    }


def _log_devices(devices):
    sync = "; synchronised BN" if devices.sync_bn else ""
    count = f"{devices.replicas} device{'s' if devices.replicas > 1 else ''}"
    strategy = distribute.strategy_name(devices.strategy)
    how = "" if devices.replicas == 1 else f" with {strategy}"
    where = {"host": "tf.data on the host", "device": "augmented on the device"}[devices.input]
    logger.info(
        f"device: {distribute.device_summary(devices.gpus)}; trains on {count}{how}; "
        f"precision {devices.precision}; XLA {'on' if devices.jit_compile else 'off'}{sync}; "
        f"input: {where}{devices.reason}"
    )


def _log_start(config, resolved):
    total = resolved["total_steps"]
    logger.info(
        f"global batch {config.batch_size} ({resolved['per_replica_batch']} per replica); "
        f"peak LR {config.peak_lr:g} (`lr={config.lr:g}` for batch 128, scaling "
        f"{config.lr_scaling}); {config.epochs} epochs x {resolved['steps_per_epoch']} steps = "
        f"{total} steps; schedule {config.schedule}, warmup {config.warmup_steps}; "
        f"recipe {config.recipe}"
    )
    if config.warmup_steps >= total:
        logger.info(
            f"warning: `warmup_steps={config.warmup_steps}` >= {total} total steps: "
            "the learning rate never reaches its peak"
        )


def _log_done(model, config, logs, summary):
    loss = f"train loss {logs['loss']:.4f}" if "loss" in logs else "no training step left"
    val = (
        f"val top-1 {logs['val_top1']:.2%}, top-5 {logs['val_top5']:.2%}"
        if "val_top1" in logs
        else "no validation"
    )
    logger.info(
        f"done: {model.name}, {config.epochs} epochs in {summary['seconds']:.0f} s; "
        f"{loss}, {val}; model -> {summary['output']}"
    )


# ------------------------------------------------------------------ the run


def _fit(config, devices, run, datasets, resolved):
    """Builds, resumes (when a backup is there), fits and saves the model in an
    open run directory."""
    started = time.time()
    train_arrays, val_ds = datasets
    steps = resolved["steps_per_epoch"]
    model = build_and_compile(config, devices)
    _log_start(config, resolved)
    initial_epoch = run.resume(model, config.epochs, steps, scope=devices.strategy.scope)
    if not initial_epoch and config.initial_checkpoint:
        warm_start(model, config.initial_checkpoint)
    if initial_epoch and config.randaugment:
        logger.info(
            "note: the draws of `randaugment` are not keyed by the step: after a resume they "
            "differ from an uninterrupted run's (the order and the other augmentations do not)"
        )
    history = model.fit(
        train_batches(config, devices, train_arrays, start_step=initial_epoch * steps),
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        validation_data=val_ds,
        validation_steps=config.val_steps,
        validation_batch_size=config.batch_size if isinstance(val_ds, tuple) else None,
        validation_freq=config.val_freq or 1,
        verbose=config.verbose,
        shuffle=False,  # the pipeline shuffles, keyed by the seed and the step
        callbacks=make_callbacks(config, devices, run, steps),
    )
    logs, summary = run.finish(model, history, run_summary(model, config, started))
    _log_done(model, config, logs, summary)
    return TrainResult(model=model, logs=logs, summary=summary)


def train(config):
    """Runs the training job described by a `TrainConfig`.

    Args:
        config: a `nam_keras.config.TrainConfig`.

    With `config.verbose` 1 or 2 and no logging handler set up (neither
    on the `"nam_keras"` logger nor the root one), the progress lines that
    `train.py` prints are printed too; `verbose=0` keeps it quiet.

    Returns:
        A `TrainResult` with the trained model, the last epoch's logs and
        the summary written to the run directory (for a run that had finished
        before: its model and summary, without training).

    Raises:
        ConfigError: settings, paths, disk space or a backup that cannot work.
        DataError: the data source is missing or malformed.
        NonFiniteLossError: the loss became NaN/inf (the last backup is kept).
        TrainingInterruptedError: SIGTERM or Ctrl-C (the last backup is kept).
    """
    with _progress_lines(config.verbose):
        return _train(config)


@contextlib.contextmanager
def _progress_lines(verbose):
    """Prints the `"nam_keras"` logger's lines while the block runs, unless
    `verbose` is 0 or logging is set up (a command line's, or the caller's)."""
    log = logging.getLogger("nam_keras")
    if not verbose or log.handlers or logging.getLogger().handlers:
        yield
        return
    handler, level, propagate = cli.ConsoleHandler(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def _train(config):
    devices = set_up_devices(config)
    _log_devices(devices)
    RunDirectory.check_paths(config.resolved_run_dir, config.resolved_output)  # before the data
    _check_initial_checkpoint(config.initial_checkpoint)
    train_arrays, val_ds = load_datasets(config, devices)
    resolved = resolved_config(config, devices, len(train_arrays[1]))
    with (
        distribute.fit_scope(devices.strategy),
        RunDirectory.open(
            config.resolved_run_dir,
            config.resolved_output,
            resolved,
            config.resume_keys(),
            resume=config.resume,
            defaults=settings.RESUME_DEFAULTS,
            extend=config.extend,
        ) as run,
    ):
        if run.finished is not None:
            done = run.finished
            logger.info(
                f"this run is complete ({done['epochs']} epochs, model -> {done['output']});"
                " nothing to do. Pass `resume=False` to train it again."
            )
            return TrainResult(model=run.load_finished_model(), logs={}, summary=done)
        return _fit(config, devices, run, (train_arrays, val_ds), resolved)
