"""Runs a scenario: supervisor, rank worker, workload, checkpoints, events, golden runs."""
