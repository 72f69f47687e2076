"""A training run: its plan, the trainer's loop, the optimizer and schedule, numerics, state and metrics."""
