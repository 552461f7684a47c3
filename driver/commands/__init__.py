"""`nanosil train` and `nanosil evaluate`."""
