"""The plain torch training loop, checkpoints, and the Ray Train glue."""
