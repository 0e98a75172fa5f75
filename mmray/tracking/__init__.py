"""MLflow logging of sweeps and trials."""
