"""The settings of `train.py` and `evaluate.py`: one table each.

Each setting is one dataclass field with its default, help text, validator
and flags. The command lines' argparse parsers (`nam_keras.cli`), a run's
`config.json` and the resume check are all derived from these tables, so a
setting is written once. Constructing a config validates it: programmatic
use gets the same checks and messages as the command line.
"""

import dataclasses
import math
import os

from nam_keras.errors import ConfigError

# The choices below are those of the library's registries, written out so that
# parsing a command line imports no Keras; tests/test_config.py checks each list
# against its registry (`data.sources`, `models.resnet`, `layers.attention`,
# `data.pipeline`, `training.schedules`).
DATASETS = ("cifar100", "synthetic")
DEPTHS = (18, 34, 50, 101, 152)
STEMS = ("cifar", "imagenet")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
#: --attention values: the registered modules and the plain ResNet
MODELS = ("nam", "se", "cbam", "bam", "baseline")
SCHEDULES = ("warmup-cosine", "epoch-cosine", "multistep")
AUGMENTATIONS = ("reference", "crop-flip", "none")
#: Where training batches are made (`--input`); `auto` is resolved by `train.py`.
INPUTS = ("auto", "host", "device")
#: Settings that are arguments of one attention module: module -> {setting: its
#: argument}. They apply to that module only: given with another, they are refused,
#: and they are resume keys only for the runs that use them.
ATTENTION_OPTIONS = {
    "nam": {"spatial": "spatial", "sparsity": "sparsity", "stop_gradient": "stop_gradient"},
}
MAX_SEED = 2**32 - 1
MAX_WIDTH = 1024
#: Largest count a setting takes (epochs, steps, milestones, batch...): the int32 that
#: the step counters and the schedules' tensors hold. Larger ones are typing mistakes.
MAX_COUNT = 2**31 - 1
#: Largest --synthetic-size: 10 times CIFAR-100's 50,000 training images. Each image
#: is 3,072 bytes in memory, so 500,000 of them are 1.5 GB per split.
MAX_SYNTHETIC_SIZE = 500_000


# ------------------------------------------------------------------ validators
# Each takes a command-line string or a Python value and returns the value, or
# raises ValueError with the message argparse and ConfigError show.


def positive_int(value):
    """An integer in [1, MAX_COUNT]."""
    number = _int(value, "a positive integer")
    if number < 1:
        raise ValueError(f"expected a positive integer, received {number}")
    return _at_most_max_count(number)


def synthetic_count(value):
    """A number of synthetic images in [1, MAX_SYNTHETIC_SIZE]: more would not fit in
    memory (3,072 bytes an image) long before any use."""
    number = positive_int(value)
    if number > MAX_SYNTHETIC_SIZE:
        raise ValueError(
            f"expected at most {MAX_SYNTHETIC_SIZE:,} images per split (10 times CIFAR-100's "
            f"50,000 training images; 3,072 bytes each in memory), received {number:,}"
        )
    return number


def network_width(value):
    """An integer in [1, 1024]: 64 is the paper's ResNet; 1024 already has
    256 times its 23.8 M parameters."""
    number = positive_int(value)
    if number > MAX_WIDTH:
        raise ValueError(f"expected a width in [1, {MAX_WIDTH}], received {number}")
    return number


def non_negative_int(value):
    """An integer in [0, MAX_COUNT]."""
    number = _int(value, "an integer >= 0")
    if number < 0:
        raise ValueError(f"expected an integer >= 0, received {number}")
    return _at_most_max_count(number)


def _at_most_max_count(number):
    if number > MAX_COUNT:
        raise ValueError(
            f"expected an integer <= {MAX_COUNT} (2**31 - 1, what the step counters and "
            f"schedules hold), received {number if number < 10**15 else f'{number:.3g}'}"
        )
    return number


def output_path(value):
    """A path to be written: its name must be encodable as UTF-8, as Keras, TensorFlow
    and config.json write it as text (a non-UTF-8 byte fails deep inside them)."""
    text = os.fspath(value)
    if isinstance(text, bytes):
        raw = text
    else:
        try:
            raw = os.fsencode(text)
        except UnicodeError:  # a lone surrogate that is not an undecodable byte
            raise ValueError(f"expected a path encodable as UTF-8, received {text!r}") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"expected a path encodable as UTF-8, received {text!r} (bytes {raw!r}); "
            "Keras and TensorFlow write paths as UTF-8 text: choose another name"
        ) from None
    if b"\0" in raw:
        raise ValueError(f"expected a path without NUL characters, received {text!r}")
    return value


def random_seed(value):
    """An integer in [0, 2**32 - 1] (what NumPy and TensorFlow seeds accept)."""
    number = _int(value, f"an integer in [0, {MAX_SEED}]")
    if not 0 <= number <= MAX_SEED:
        raise ValueError(f"expected an integer in [0, {MAX_SEED}], received {number}")
    return number


def non_negative_float(value):
    """A finite number >= 0."""
    number = _float(value, "a number >= 0")
    if not number >= 0:
        raise ValueError(f"expected a number >= 0, received {number}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number >= 0, received {number}")
    return number


def fraction(value):
    """A number in [0, 1)."""
    number = _float(value, "a number in [0, 1)")
    if not 0 <= number < 1:
        raise ValueError(f"expected a number in [0, 1), received {number}")
    return number


def _int(value, what):
    if isinstance(value, bool):
        raise ValueError(f"expected {what}, received {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected {what}, received {value!r}") from None
    if isinstance(value, float) and value != number:
        raise ValueError(f"expected {what}, received {value!r}")
    return number


def _float(value, what):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected {what}, received {value!r}") from None


# ------------------------------------------------------------------ recipes

#: --recipe NAME -> the settings it presets (every flag given on the command
#: line overrides them; the resolved values go to config.json).
RECIPES = {
    # This project's defaults: LR 0.1 per 128 images, 2,000 warmup steps, cosine to 0.
    "default": {},
    # The Paddle write-ups the project started from: Momentum(LinearWarmup(
    # CosineAnnealingDecay(0.01, 300), 2000)), the warmup stepped per batch, the
    # cosine per epoch; batch 256; the full reference augmentation.
    "seed": {
        "epochs": 300,
        "batch_size": 256,
        "lr": 0.01,
        "lr_scaling": "none",
        "schedule": "epoch-cosine",
        "warmup_steps": 2000,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "augment": "reference",
    },
    # The official NAM code (Christian-lyc/NAM, train_cifar100.py): SGD 0.1,
    # MultiStepLR(60/120/160, x0.2) per epoch, no warmup, crop + flip, NAM
    # weights detached (`.data`), sparsity 1e-4. Its CIFAR-100 run normalises
    # with the CIFAR-10 statistics (a bug); the model here always uses CIFAR-100's.
    "official": {
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "lr_scaling": "none",
        "schedule": "multistep",
        "warmup_steps": 0,
        "milestones": (60, 120, 160),
        "lr_decay": 0.2,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "augment": "crop-flip",
        "stop_gradient": True,
        "sparsity": 1e-4,
    },
}


# ------------------------------------------------------------------ the tables


def setting(default, help, group, *, type=None, choices=None, resume=False, **argparse_kwargs):
    """One row of a settings table: a dataclass field with its CLI metadata.

    Args:
        default: the default value.
        help: the `--help` text.
        group: the `--help` section.
        type: validator (see above); `None` for strings and flags.
        choices: the allowed values.
        resume: a backup may only be resumed when this setting is unchanged.
        **argparse_kwargs: `action`, `nargs`, `metavar`, `flags`
            (mutually exclusive options, `{"--flag": (value, help)}`), `positional`.
    """
    metadata = {
        "help": help,
        "group": group,
        "type": type,
        "choices": choices,
        "resume": resume,
        **argparse_kwargs,
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the CIFAR-100 data comes from (shared by training and evaluation)."""

    dataset: str = setting(
        "cifar100",
        "cifar100 (TFDS, or the local archive given by --data-dir) or synthetic "
        "random data of the same shapes",
        "data",
        choices=DATASETS,
    )
    data_dir: str = setting(
        None,
        "local cifar-100-python.tar.gz, its folder, or the extracted cifar-100-python/ "
        "folder; used instead of TFDS",
        "data",
        metavar="PATH",
    )
    tfds_data_dir: str = setting(
        None, "TensorFlow Datasets folder (default ~/tensorflow_datasets)", "data", metavar="DIR"
    )
    synthetic_size: tuple = setting(
        (50_000, 10_000),
        f"number of train and test examples of --dataset synthetic (at most "
        f"{MAX_SYNTHETIC_SIZE:,} each)",
        "data",
        type=synthetic_count,
        nargs=2,
        metavar=("TRAIN", "TEST"),
    )

    def __post_init__(self):
        validate(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig(DataConfig):
    """Everything `train.py` can be asked for; `train.py --help` lists it."""

    # === model ===
    recipe: str = setting(
        "default",
        "preset of the optimisation settings (see RECIPES; every flag given overrides it): "
        "default (this project's), seed (the Paddle write-ups), official (the official "
        "NAM code's train_cifar100.py)",
        "model",
        choices=tuple(RECIPES),
    )
    model: str = setting(
        "nam",
        "attention module in the ResNet: nam, se, cbam (in every block), bam (between "
        "stages), or baseline (none)",
        "model",
        choices=MODELS,
        resume=True,
        option="--attention",
        flags={
            "--nam": ("nam", "ResNet with NAM in every block (the default)"),
            "--baseline": ("baseline", "the same ResNet without attention"),
        },
    )
    depth: int = setting(50, "ResNet depth", "model", type=int, choices=DEPTHS, resume=True)
    width: int = setting(
        64,
        "channels of the first stage (64 = the paper's ResNet; smaller for smoke runs)",
        "model",
        type=network_width,
        resume=True,
    )
    stem: str = setting(
        "cifar",
        "cifar: 3x3 conv, no pooling; imagenet: 7x7/2 conv + max-pool",
        "model",
        choices=STEMS,
        resume=True,
    )
    spatial: bool = setting(
        False,
        "add NAM pixel attention after the channel one (--attention nam only)",
        "model",
        action="store_true",
        resume=True,
    )
    sparsity: float = setting(
        1e-4,
        "weight p of the L1 penalty on the NAM BN scales, 0 disables (--attention nam only)",
        "model",
        type=non_negative_float,
        resume=True,
    )
    stop_gradient: bool = setting(
        False,
        "no gradient through the NAM weights, as the official PyTorch code (--attention nam only)",
        "model",
        action="store_true",
        resume=True,
    )

    fuse_attention: bool = setting(
        True,
        "compute NAM and the BN in front of it as one layer (BatchNormNAM: the same function "
        "and weights, less memory traffic); --no-fuse-attention builds them apart, as 0.3 did "
        "(--attention nam only)",
        "model",
        action="boolean_optional",
        resume=True,
    )

    initial_checkpoint: str = setting(
        None,
        "start from the weights of this trained .keras file (fine-tuning, warm start); the "
        "optimizer starts afresh",
        "model",
        type=output_path,
        metavar="PATH",
        resume=True,
    )

    # === optimisation ===
    epochs: int = setting(300, "number of epochs", "optimisation", type=positive_int, resume=True)
    batch_size: int = setting(
        128,
        "global batch size (split across replicas)",
        "optimisation",
        type=positive_int,
        resume=True,
    )
    lr: float = setting(
        0.1,
        "peak learning rate for batch 128",
        "optimisation",
        type=non_negative_float,
        resume=True,
    )
    lr_scaling: str = setting(
        "linear",
        "linear: peak LR = --lr * batch / 128; none: peak LR = --lr",
        "optimisation",
        choices=("linear", "none"),
        resume=True,
    )
    schedule: str = setting(
        "warmup-cosine",
        "warmup-cosine: cosine decay to 0 stepped per step; epoch-cosine: cosine over "
        "--epochs stepped per epoch after the warmup (Paddle's CosineAnnealingDecay); "
        "multistep: x --lr-decay at each of --milestones",
        "optimisation",
        choices=SCHEDULES,
        resume=True,
    )
    warmup_steps: int = setting(
        2000,
        "linear warmup steps from 0 before the schedule",
        "optimisation",
        type=non_negative_int,
        resume=True,
    )
    milestones: tuple = setting(
        (60, 120, 160),
        "epochs at which --schedule multistep multiplies the LR by --lr-decay",
        "optimisation",
        type=positive_int,
        nargs="+",
        metavar="EPOCH",
        resume=True,
    )
    lr_decay: float = setting(
        0.2,
        "factor of --schedule multistep at each milestone",
        "optimisation",
        type=non_negative_float,
        resume=True,
    )
    momentum: float = setting(0.9, "SGD momentum", "optimisation", type=fraction, resume=True)
    weight_decay: float = setting(
        5e-4,
        "L2 added to the gradient (PyTorch/Paddle semantics)",
        "optimisation",
        type=non_negative_float,
        resume=True,
    )
    steps_per_epoch: int = setting(
        None,
        "steps per epoch (default: train examples // batch); caps smoke runs",
        "optimisation",
        type=positive_int,
        resume=True,
    )
    augment: str = setting(
        "reference",
        "reference: per-image crop, flip, rotation, brightness, contrast; crop-flip: the "
        "official NAM code's; none",
        "optimisation",
        choices=AUGMENTATIONS,
        resume=True,
        flags={"--no-augment": ("none", "no augmentation (same as --augment none)")},
    )
    randaugment: bool = setting(
        False,
        "add keras.layers.RandAugment",
        "optimisation",
        action="store_true",
        resume=True,
    )
    mixup: float = setting(
        0.0, "MixUp alpha (0: off)", "optimisation", type=non_negative_float, resume=True
    )
    cutmix: float = setting(
        0.0, "CutMix alpha (0: off)", "optimisation", type=non_negative_float, resume=True
    )
    label_smoothing: float = setting(
        0.0,
        "label smoothing EPS of the cross-entropy (0: off); composes with MixUp/CutMix",
        "optimisation",
        type=fraction,
        resume=True,
    )
    ema: float = setting(
        0.0,
        "keep an exponential moving average of the weights with this decay (e.g. 0.9999; "
        "0: off); validation, the saved model and the export use it",
        "optimisation",
        type=fraction,
        resume=True,
    )
    val_freq: int = setting(
        1,
        "validate on the test split every N epochs (0: never)",
        "optimisation",
        type=non_negative_int,
    )
    val_steps: int = setting(None, "cap on validation batches", "optimisation", type=positive_int)
    seed: int = setting(
        0,
        "seed of the weights, the shuffling and the augmentation",
        "optimisation",
        type=random_seed,
        resume=True,
    )

    # === devices ===
    precision: str = setting(
        "auto",
        "auto: mixed_bfloat16 on Ampere+ GPUs and CPUs with AMX-BF16, mixed_float16 on "
        "older GPUs, else float32",
        "devices",
        choices=PRECISIONS,
        resume=True,
    )
    jit_compile: str = setting(
        "auto",
        "XLA; auto: always on JAX; on TensorFlow on for GPUs, off for CPUs; off on PyTorch",
        "devices",
        choices=("auto", "on", "off"),
    )
    input: str = setting(
        "auto",
        "where training batches are made: host = tf.data on the CPU; device = uint8 "
        "batches augmented on the accelerator inside the compiled train step (no "
        "TensorFlow needed); auto: device when TensorFlow is not installed, else host",
        "devices",
        choices=INPUTS,
        resume=True,
    )
    sync_bn: bool = setting(
        None,
        "BN batch statistics over all replicas (default: on with several replicas, so "
        "that they train like one device on the global batch)",
        "devices",
        action="boolean_optional",
    )
    cpu_replicas: int = setting(
        0,
        "split the CPU into N devices and train over them (tf.distribute on TensorFlow, "
        "keras.distribution on JAX; exercises the multi-device path without GPUs)",
        "devices",
        type=non_negative_int,
    )
    cluster_timeout: float = setting(
        600.0,
        "seconds to wait for the other workers (TF_CONFIG, or JAX_COORDINATOR_ADDRESS on JAX) "
        "before giving up",
        "devices",
        type=non_negative_float,
    )

    # === outputs ===
    run_dir: str = setting(
        None,
        "config, CSV/TensorBoard logs and backups (default runs/nam or runs/baseline)",
        "outputs",
        type=output_path,
    )
    output: str = setting(
        None,
        "final model file (default nam.keras or baseline.keras)",
        "outputs",
        type=output_path,
    )
    resume: bool = setting(
        True,
        "resume from the run directory's backup if there is one",
        "outputs",
        action="boolean_optional",
    )
    extend: bool = setting(
        False,
        "let --epochs exceed the run directory's recorded run: a finished run goes on from its "
        "model and optimizer state, the schedule recomputed for the new --epochs",
        "outputs",
        action="store_true",
    )
    verbose: int = setting(
        1,
        "Keras verbosity: 1 = progress bar, 2 = one line per epoch",
        "outputs",
        type=int,
        choices=(0, 1, 2),
    )

    def __post_init__(self):
        super().__post_init__()
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(
                f"--milestones must be strictly increasing epochs; received {list(self.milestones)}"
            )
        self._check_milestones()
        if not math.isfinite(self.peak_lr):
            raise ConfigError(
                f"--lr {self.lr:g} with --batch-size {self.batch_size} gives a peak learning "
                f"rate of {self.peak_lr:g} after --lr-scaling {self.lr_scaling} "
                "(--lr * batch / 128): not a finite number. Lower --lr."
            )
        self._check_attention_options()

    def _check_milestones(self):
        """`--schedule multistep`: every milestone is an epoch of the run. Milestone m
        lowers the rate from epoch m (0-based) on, so m >= --epochs would never act."""
        if self.schedule != "multistep":
            return
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            raise ConfigError(
                f"--milestones {' '.join(map(str, late))} not below --epochs {self.epochs}: "
                f"milestone m lowers the rate from epoch m (0-based) on, so these would "
                f"never act. Give milestones < {self.epochs}, or more --epochs."
            )

    def _check_attention_options(self, given=()):
        """Refuses a module's option for another module: set away from its default,
        or named in `given` (the options typed on a command line)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        for name, module in unused_attention_options(self.model).items():
            field = fields[name]
            if getattr(self, name) != field.default or name in given:
                raise ConfigError(
                    f"{flag(field)} is an option of --attention {module} only; received it "
                    f"with --attention {self.model}, which does not use it. Drop it."
                )

    def check_given(self, given):
        """Refuses options typed on the command line that this run does not use,
        even where they equal the default (`cli.parse_config` calls it)."""
        self._check_attention_options(given)

    # === derived ===
    @property
    def mixing(self):
        """MixUp or CutMix on: labels are one-hot."""
        return bool(self.mixup or self.cutmix)

    @property
    def one_hot(self):
        """Labels are one-hot: MixUp, CutMix or label smoothing."""
        return self.mixing or self.label_smoothing > 0

    @property
    def attention_kwargs(self):
        """The arguments of the attention module that come from the settings."""
        options = ATTENTION_OPTIONS.get(self.model, {})
        return {argument: getattr(self, name) for name, argument in options.items()}

    def resume_keys(self):
        """Settings (and derived values) a backup must share with the run resuming it:
        the `resume=True` rows, but the options of modules this run does not use."""
        unused = unused_attention_options(self.model)
        if self.model != "nam":  # only NAM has a fused form (build_resnet's fuse_attention)
            unused = {*unused, "fuse_attention"}
        return (*(k for k in resume_fields() if k not in unused), "num_classes", "mixing")

    @property
    def peak_lr(self):
        """`--lr`, scaled linearly with the batch unless `--lr-scaling none`."""
        scale = self.batch_size / 128 if self.lr_scaling == "linear" else 1.0
        return self.lr * scale

    @classmethod
    def from_recipe(cls, recipe="default", **overrides):
        """The config of a recipe preset (see `RECIPES`), `overrides` winning.

        `TrainConfig(recipe=...)` only records the name; this applies it.
        """
        if recipe not in RECIPES:
            raise ConfigError(f"--recipe: invalid choice {recipe!r} (choose from {tuple(RECIPES)})")
        preset = dict(RECIPES[recipe])
        _check_recipe_milestones(recipe, preset, overrides)
        model = overrides.get("model", preset.get("model", cls.model))
        for name in unused_attention_options(model):  # a recipe's NAM options: NAM only
            preset.pop(name, None)
        return cls(**{**preset, **overrides, "recipe": recipe})

    @property
    def resolved_run_dir(self):
        return self.run_dir or f"runs/{self.model}"

    @property
    def resolved_output(self):
        return self.output or f"{self.model}.keras"


@dataclasses.dataclass(frozen=True)
class EvalConfig(DataConfig):
    """Everything `evaluate.py` can be asked for."""

    model: str = setting(
        None,
        "a .keras file written by train.py, or what evaluate.py exported from one (a "
        "SavedModel version folder, a .tflite or .onnx file)",
        "model",
        positional=True,
    )
    batch_size: int = setting(256, "evaluation batch size", "evaluation", type=positive_int)
    json: str = setting(
        None,
        "write the full report (per-class accuracy, NAM weights) here",
        "evaluation",
        type=output_path,
        metavar="FILE",
    )
    plots: str = setting(
        None,
        "write nam_weights.png (NAM channel weights per block) here",
        "evaluation",
        type=output_path,
        metavar="DIR",
    )
    near_zero: float = setting(
        0.1,
        "a NAM weight counts as near zero below this fraction of the uniform weight 1/C",
        "evaluation",
        type=float,
    )
    export: str = setting(
        None,
        "also write a TF Serving SavedModel to DIR/<version>/",
        "evaluation",
        type=output_path,
        metavar="DIR",
    )
    tta: str = setting(
        "none",
        "test-time augmentation: flip = average the probabilities of each image and its mirror",
        "evaluation",
        choices=("none", "flip"),
    )
    export_tflite: str = setting(
        None,
        "also write a LiteRT (TFLite) model here (a .tflite file; uint8 images in, "
        "probabilities out)",
        "evaluation",
        type=output_path,
        metavar="FILE",
    )
    tflite_quantize: str = setting(
        "none",
        "weights of the LiteRT model: none (float32), float16, or dynamic (int8 weights)",
        "evaluation",
        choices=("none", "float16", "dynamic"),
    )
    export_onnx: str = setting(
        None,
        "also write an ONNX model here (an .onnx file; uint8 images in, probabilities out; "
        "runs with onnxruntime)",
        "evaluation",
        type=output_path,
        metavar="FILE",
    )
    skip_eval: bool = setting(
        False, "no test-set evaluation (report/export only)", "evaluation", action="store_true"
    )
    seed: int = setting(0, "seed of --dataset synthetic", "evaluation", type=random_seed)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.near_zero <= 1:
            raise ConfigError(f"--near-zero must be in (0, 1]; received {self.near_zero}")
        if self.export_tflite is not None and not str(self.export_tflite).endswith(".tflite"):
            raise ConfigError(
                f"--export-tflite must name a .tflite file; received {self.export_tflite!r}"
            )
        if self.export_onnx is not None and not str(self.export_onnx).endswith(".onnx"):
            raise ConfigError(
                f"--export-onnx must name an .onnx file; received {self.export_onnx!r}"
            )


# ------------------------------------------------------------------ derived views


def unused_attention_options(model):
    """The settings that are options of attention modules other than `model`:
    `{setting: its module}`."""
    return {
        name: module
        for module, options in ATTENTION_OPTIONS.items()
        if module != model
        for name in options
    }


def _check_recipe_milestones(recipe, preset, overrides):
    """A recipe's milestones are epochs of its own --epochs: with fewer --epochs given
    and no --milestones, say so (rather than drop or rescale them silently)."""
    if "milestones" in overrides or "milestones" not in preset or "epochs" not in overrides:
        return
    if overrides.get("schedule", preset.get("schedule")) != "multistep":
        return
    try:
        epochs = positive_int(overrides["epochs"])
    except ValueError:
        return  # the table's validator names the bad value
    milestones = preset["milestones"]
    late = [m for m in milestones if m >= epochs]
    if not late:
        return
    scaled = sorted({max(1, round(m * epochs / preset["epochs"])) for m in milestones})
    scaled = [m for m in scaled if m < epochs]
    if scaled:
        what = f"Give --milestones below {epochs} (e.g. {' '.join(map(str, scaled))}, the "
        what += "recipe's scaled), or another --schedule."
    else:
        what = "No milestone can act in one epoch: give another --schedule."
    raise ConfigError(
        f"--recipe {recipe} presets --milestones {' '.join(map(str, milestones))} for its "
        f"--epochs {preset['epochs']}; with --epochs {epochs}, milestone(s) "
        f"{' '.join(map(str, late))} would never act. {what}"
    )


def flag(field):
    """The command-line flag of a field: `batch_size` -> `--batch-size`
    (`model` -> `--attention`, its `option`)."""
    return field.metadata.get("option") or "--" + field.name.replace("_", "-")


def validate(config):
    """Checks every field against its table row; raises `ConfigError`."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None or field.metadata.get("positional"):
            continue
        check = field.metadata.get("type")
        values = value if field.metadata.get("nargs") else (value,)
        try:
            checked = tuple(check(v) if check else v for v in values)
        except ValueError as err:
            raise ConfigError(f"{flag(field)}: {err}") from None
        choices = field.metadata.get("choices")
        if choices and any(v not in choices for v in checked):
            raise ConfigError(f"{flag(field)}: invalid choice {value!r} (choose from {choices})")
        object.__setattr__(
            config, field.name, checked if field.metadata.get("nargs") else checked[0]
        )


def resume_fields(config_class=TrainConfig):
    """Names of the settings that must match for a backup to be resumed."""
    return tuple(f.name for f in dataclasses.fields(config_class) if f.metadata.get("resume"))


def _defaults(config_class=TrainConfig):
    return {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in dataclasses.fields(config_class)
    }


def to_dict(config):
    """The settings as JSON-ready values (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


#: What a run directory written before a setting existed used for it: the default, but
#: the NAM of runs before `fuse_attention` existed was the BN then NAMAttention (its
#: backups hold that layout, which only `--no-fuse-attention` builds), and runs before
#: `input` made their batches on the host.
RESUME_DEFAULTS = {**_defaults(), "fuse_attention": False, "input": "host"}
