"""MLflow logging of sweeps and trials (`mlflow_log`), reading a sweep back for the report
(`mlflow_read`), and where they go (`TrackingConfig`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrackingConfig:
    # MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db.
    uri: str = ""
    # Experiment name; empty: the ablation's name (or "mmray" for a single run).
    experiment: str = ""
