"""The training loop and what it leans on: optimiser and schedule, checkpoints, metrics."""
