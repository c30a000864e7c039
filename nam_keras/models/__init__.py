"""The networks: CIFAR-style ResNets with an attention module in every block.
Backend-independent (no TensorFlow needed)."""
