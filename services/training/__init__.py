"""Training runs: data preparation, the step loop, checkpoints. Runs in a worker process the
trainer service spawns, so a crash or out-of-memory of a run never kills the service."""
