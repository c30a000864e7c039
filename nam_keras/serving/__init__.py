"""Serving: the TF Serving SavedModel and LiteRT exports (TensorFlow), and the
REST client (standard library and NumPy)."""
