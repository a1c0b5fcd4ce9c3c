"""Training: the run (set up → build → fit → finish), its loop, step plan, loss, checkpoints and records."""
