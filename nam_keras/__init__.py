"""nam-keras: NAM (Normalization-based Attention Module) in a CIFAR ResNet, Keras 3.

Importing this package registers its serialisable objects, so that
`keras.models.load_model("nam.keras")` works. The package is laid out by
concept, and by what each part needs:

- `nam_keras.layers` (NAM, SE, CBAM, BAM, BatchNormalization), `nam_keras.models`
  (the ResNets), `nam_keras.training.optimizers` and `nam_keras.training.schedules`:
  `keras.ops` only, on every Keras backend, no TensorFlow;
- `nam_keras.cifar100` (the dataset's facts), `nam_keras.config` (the settings),
  `nam_keras.data.sources` (the data as NumPy arrays): plain Python and NumPy;
- `nam_keras.data.pipeline` (`tf.data`), `nam_keras.training.experiment` (the
  training run) and `nam_keras.serving.export` (SavedModel, LiteRT): TensorFlow;
- `nam_keras.reports` (evaluation, comparison of runs).

This module re-exports the public API of the backend-independent parts.
"""

from nam_keras import console as _console

with _console.quiet_startup(enabled=_console.quiet_by_default()):
    _console.tidy_python_messages()
    import keras as _keras  # imports the backend: TensorFlow's start-up noise

    if _keras.backend.backend() == "tensorflow":  # CUDA's probing, noisy without a GPU
        import tensorflow as _tf

        _tf.config.list_physical_devices("GPU")

from nam_keras.cifar100 import MEAN as CIFAR100_MEAN
from nam_keras.cifar100 import STD as CIFAR100_STD
from nam_keras.config import EvalConfig, TrainConfig
from nam_keras.errors import (
    ConfigError,
    DataError,
    ModelError,
    NonFiniteLossError,
    TrainingInterruptedError,
)
from nam_keras.layers.attention import (
    ATTENTIONS,
    NAMAttention,
    create_attention,
    get_attention,
    register_attention,
)
from nam_keras.layers.attention_baselines import BAMAttention, CBAMAttention, SEAttention
from nam_keras.layers.batch_norm_nam import BatchNormNAM
from nam_keras.layers.normalization import BN_EPSILON, BN_MOMENTUM, batch_normalization
from nam_keras.models.resnet import RESNET_CONFIGS, build_resnet, nam_layers
from nam_keras.training.callbacks import NAMSparsity, StopOnNonFiniteLoss
from nam_keras.training.optimizers import TorchSGD
from nam_keras.training.schedules import (
    EpochCosine,
    EpochCosineDecay,
    MultiStep,
    MultiStepDecay,
    WarmupCosine,
    WarmupCosineDecay,
    epoch_cosine,
    multistep,
    warmup_cosine,
)
from nam_keras.training.trainer import CrossEntropyModel

__version__ = "0.3.0"

__all__ = [
    "ATTENTIONS",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "RESNET_CONFIGS",
    "BAMAttention",
    "BatchNormNAM",
    "CBAMAttention",
    "ConfigError",
    "CrossEntropyModel",
    "DataError",
    "EpochCosine",
    "EpochCosineDecay",
    "EvalConfig",
    "ModelError",
    "MultiStep",
    "MultiStepDecay",
    "NAMAttention",
    "NAMSparsity",
    "NonFiniteLossError",
    "SEAttention",
    "StopOnNonFiniteLoss",
    "TorchSGD",
    "TrainConfig",
    "TrainingInterruptedError",
    "WarmupCosine",
    "WarmupCosineDecay",
    "batch_normalization",
    "build_resnet",
    "create_attention",
    "epoch_cosine",
    "get_attention",
    "multistep",
    "nam_layers",
    "register_attention",
    "warmup_cosine",
]
