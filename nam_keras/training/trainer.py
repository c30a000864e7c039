"""The model `train.py` fits: the network, with the cross-entropy as its `loss`.

NAM adds its L1 sparsity penalty with `add_loss`, and Keras adds such layer
losses into the `loss` it logs, so a training log's `loss` would not be the
cross-entropy that `evaluate.py` reports for the same model. `CrossEntropyModel`
keeps training exactly as before (the gradient is that of cross-entropy plus
penalty) but reports the two apart: `loss` (and `val_loss`) is the compiled
loss alone, `sparsity_penalty` (and `val_sparsity_penalty`) the sum of the
layers' added losses.

Its `batch_maker` (not saved) makes the training batch inside the compiled
train step from what the input yields: `train.py --input device` sets it to a
`nam_keras.data.device_input.DeviceAugmentation`.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="nam_keras")
class CrossEntropyModel(keras.Model):
    """A functional model whose `loss` is its compiled loss; the layers'
    `add_loss` terms are still minimised and are logged as `sparsity_penalty`.

    The loss it returns to the optimizer is `compiled + (penalty -
    stop_gradient(penalty))`: its value is the compiled loss exactly, its
    gradient that of compiled loss plus penalty.

    Build it around a functional network with `CrossEntropyModel.wrap(model)`
    (the same layers and weights). It saves and loads as a `.keras` file like
    any functional model (`import nam_keras` registers it).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.penalty_tracker = keras.metrics.Mean(name="sparsity_penalty")
        #: `None`, or a function of an input element returning `(x, y)`,
        #: called in the train step (so compiled with it); not saved.
        self.batch_maker = None

    def train_step(self, *args):
        """Keras' train step (`(state, data)` on JAX, `(data,)` elsewhere), on
        `batch_maker(data)` when a batch maker is set."""
        if self.batch_maker is not None:
            *state, data = args
            args = (*state, self.batch_maker(data))
        return super().train_step(*args)

    @classmethod
    def wrap(cls, model):
        """The functional `model`'s layers as a `CrossEntropyModel` of the same name."""
        return cls(model.input, model.output, name=model.name)  # its structures: one tensor

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self.loss is None:
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        loss = self.loss(y, y_pred, sample_weight)
        penalty = ops.zeros((), "float32")
        for term in self.losses:
            penalty = penalty + ops.sum(ops.cast(term, "float32"))
        self.penalty_tracker.update_state(penalty)
        penalty = ops.cast(penalty, loss.dtype)
        return loss + (penalty - ops.stop_gradient(penalty))
