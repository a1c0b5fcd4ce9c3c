"""Training: the run (set up → build → fit → finish), its state, loop, step plan, checkpoints and records."""
