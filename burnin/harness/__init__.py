"""The supervisor side (no torch): supervisor, runner, classify, cleanup, golden runs, warm spares,
network fabric and watch, campaign and burn-in schedulers."""
