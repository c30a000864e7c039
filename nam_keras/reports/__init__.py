"""Reports: a trained model's evaluation (accuracy, superclasses, NAM weights)
and the comparison of training runs (tables and plots)."""
