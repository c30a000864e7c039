"""nam-keras: NAM (Normalization-based Attention Module) in a CIFAR ResNet, Keras 3.

Importing this package registers its serialisable objects, so that
`keras.models.load_model("nam.keras")` works. The model side (layers, network,
optimizer, callbacks) is written in `keras.ops`; the data pipeline
(`nam_keras.data`), the training run (`nam_keras.experiment`) and the
SavedModel export (`nam_keras.export`) use TensorFlow.
"""

import os as _os

from nam_keras.console import QUIET_START as _QUIET_START
from nam_keras.console import quiet_startup as _quiet_startup

with _quiet_startup(enabled=_os.environ.get(_QUIET_START) == "1"):
    import keras as _keras  # noqa: F401  (imports the backend: TensorFlow's start-up noise)

from nam_keras.attention import (
    ATTENTIONS,
    NAMAttention,
    create_attention,
    get_attention,
    register_attention,
)
from nam_keras.attention_baselines import BAMAttention, CBAMAttention, SEAttention
from nam_keras.callbacks import (
    EpochCosine,
    MultiStep,
    NAMSparsity,
    StopOnNonFiniteLoss,
    WarmupCosine,
    epoch_cosine,
    multistep,
    warmup_cosine,
)
from nam_keras.config import EvalConfig, TrainConfig
from nam_keras.errors import (
    ConfigError,
    DataError,
    ModelError,
    NonFiniteLossError,
    TrainingInterruptedError,
)
from nam_keras.normalization import BN_EPSILON, BN_MOMENTUM, batch_normalization
from nam_keras.optimizers import TorchSGD
from nam_keras.resnet import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    RESNET_CONFIGS,
    build_resnet,
    nam_layers,
)

__version__ = "0.2.0"

__all__ = [
    "ATTENTIONS",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "RESNET_CONFIGS",
    "BAMAttention",
    "CBAMAttention",
    "ConfigError",
    "DataError",
    "EpochCosine",
    "EvalConfig",
    "ModelError",
    "MultiStep",
    "NAMAttention",
    "NAMSparsity",
    "NonFiniteLossError",
    "SEAttention",
    "StopOnNonFiniteLoss",
    "TorchSGD",
    "TrainConfig",
    "TrainingInterruptedError",
    "WarmupCosine",
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
