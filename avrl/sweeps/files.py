"""The files a sweep keeps in its folder for its jobs and its report: the parent MLflow run's id and the tracking
URI the sweep logged to."""

from __future__ import annotations

from pathlib import Path

from hydra.types import RunMode

from avrl.config import hydra_config

PARENT_RUN_FILE = "mlflow_parent_run_id"
TRACKING_URI_FILE = "mlflow_tracking_uri"  # the URI the sweep logged to (credentials removed): the report reads it


def parent_run_id(sweep_dir: str | Path | None = None) -> str | None:
    """The sweep's parent run, when this job is part of a multirun (or of the sweep in `sweep_dir`)."""
    if sweep_dir is None:
        hydra_cfg = hydra_config()
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        sweep_dir = hydra_cfg.sweep.dir
    path = Path(sweep_dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.exists() else None
