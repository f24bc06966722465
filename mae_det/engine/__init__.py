"""Training loops, optimizers, schedules, checkpointing."""
