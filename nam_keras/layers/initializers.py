"""Weight initialisers shared by the network and its attention modules.

Written as Keras config dicts, so that every layer gets its own instance and
the `.keras` files record them.
"""

#: He initialisation with fan-out, as torchvision initialises its ResNets' convolutions.
CONV_INIT = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "untruncated_normal"},
}

#: PyTorch's default `nn.Linear` initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
#: for the kernel and the bias.
DENSE_INIT = {
    "class_name": "VarianceScaling",
    "config": {"scale": 1.0 / 3.0, "mode": "fan_in", "distribution": "uniform"},
}
