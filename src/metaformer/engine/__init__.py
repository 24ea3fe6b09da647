"""What two or more tasks share: the epoch loop, resume state and distributed helpers."""
