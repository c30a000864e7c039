"""Training: the optimizer and learning-rate schedules (backend-independent),
the callbacks, the run directory, the devices and the training run itself
(`experiment.train`; its input pipeline uses TensorFlow's `tf.data`)."""

# registers `CrossEntropyModel` (the class of the models train.py saves) with Keras
from nam_keras.training import trainer  # noqa: F401
