"""Engine: the training loop's contract, its assembly, the step, optimizer and schedule, guards, console."""
