"""The optimizer of the reference recipe: SGD as PyTorch and Paddle apply it."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="nam_keras")
class TorchSGD(keras.optimizers.Optimizer):
    """SGD with momentum and weight decay exactly as PyTorch/Paddle apply them.

    For every trainable variable `w` with gradient `g`:

        g = g + l2 * w                 # weight decay *added to the gradient*
        buf = momentum * buf + g
        w = w - lr * buf

    This is PyTorch's `SGD(momentum=0.9, weight_decay=5e-4)` and Paddle's
    `Momentum(weight_decay=5e-4)`. It differs from `keras.optimizers.SGD`,
    whose `weight_decay=` is decoupled (applied to the weights, not the
    gradient) and whose velocity absorbs the learning rate (so a changing
    learning rate acts differently).

    Args:
        learning_rate: a float, or a `keras.optimizers.schedules.LearningRateSchedule`
            (the schedule callbacks of `training.schedules` put one on for `fit`).
        momentum: momentum factor in [0, 1). Defaults to 0.9.
        l2: the coupled weight decay (PyTorch's `weight_decay`). Defaults to 5e-4.
        **kwargs: base optimizer arguments (`name`, `clipnorm`, ...); the base
            class' decoupled `weight_decay` is refused to avoid mixing them up.
    """

    def __init__(self, learning_rate=0.1, momentum=0.9, l2=5e-4, name="torch_sgd", **kwargs):
        if kwargs.get("weight_decay"):
            raise ValueError(
                "TorchSGD applies weight decay to the gradient through `l2=`; "
                f"received the decoupled weight_decay={kwargs['weight_decay']!r}."
            )
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1); received {momentum!r}.")
        if not float(l2) >= 0.0:
            raise ValueError(f"`l2` must be >= 0; received {l2!r}.")
        self.momentum = float(momentum)
        self.l2 = float(l2)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        if self.l2:
            g = ops.add(g, ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        buf = self.momentums[self._get_variable_index(variable)]
        self.assign(buf, ops.add(ops.multiply(buf, ops.cast(self.momentum, variable.dtype)), g))
        self.assign_sub(variable, ops.multiply(lr, buf))

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "l2": self.l2})
        config.pop("weight_decay", None)
        return config
