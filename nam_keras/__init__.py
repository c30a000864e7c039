"""nam-keras: NAM (Normalization-based Attention Module) in a CIFAR ResNet, Keras 3.

Importing this package registers its serialisable objects, so that
`keras.models.load_model("nam.keras")` works.
"""

from nam_keras.layers import NAMAttention
from nam_keras.resnet import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    RESNET_CONFIGS,
    build_resnet,
    nam_layers,
)
from nam_keras.training import TorchSGD, WarmupCosine, warmup_cosine

__version__ = "0.1.0"

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "NAMAttention",
    "RESNET_CONFIGS",
    "TorchSGD",
    "WarmupCosine",
    "build_resnet",
    "nam_layers",
    "warmup_cosine",
]
