"""Diagnostics: the monitor and the measures it takes (gradients, features, drift, alarms), their
figures, the run's summary and its TensorBoard output."""
