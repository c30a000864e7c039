"""CIFAR-100 input. `sources` reads the data as NumPy arrays (plain Python and
NumPy; TFDS only when asked for); `pipeline` batches and augments it with
TensorFlow's `tf.data`."""
