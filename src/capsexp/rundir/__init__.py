"""Run folder: its files, its lock, checkpoints and resume."""
