"""Training: the loop, the sharded step, optimiser, checkpoints, experiments, input pipeline."""
