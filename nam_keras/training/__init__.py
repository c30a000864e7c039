"""Training: the optimizer and learning-rate schedules (backend-independent),
the callbacks, the run directory, the devices and the training run itself
(`experiment.train`; its input pipeline uses TensorFlow's `tf.data`)."""
