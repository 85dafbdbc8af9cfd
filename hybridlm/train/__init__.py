"""Step functions, optimizer and schedules, the training loop."""
