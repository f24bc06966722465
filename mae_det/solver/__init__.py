"""Optimizers and learning-rate schedules: a leaf shared by the training loops (engine/) and the probes (evaluation/)."""
