"""MLflow: one run per training or evaluation job, tagged with the Hydra choices, the resolved config as params
and as an artifact, sample completions as tables."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from avrl.config import flatten

TAG_GROUPS = ("algorithm", "model", "prompt", "data", "reward", "trainer", "experiment", "sweep")
_SECRET_IN_URI = re.compile(r"(//[^:/@]+:)[^@]+@")


def redact(value: object) -> object:
    """Passwords in URIs (postgresql://user:secret@host) never reach params or logs."""
    return _SECRET_IN_URI.sub(r"\1***@", value) if isinstance(value, str) else value


def _hydra_config():
    """The running job's Hydra config; None when not under @hydra.main (tests that compose configs)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def hydra_choices() -> dict[str, str]:
    hydra_cfg = _hydra_config()
    if hydra_cfg is None:
        return {}
    choices = hydra_cfg.runtime.choices
    return {g: str(choices.get(g)) for g in TAG_GROUPS if choices.get(g) not in (None, "null")}


PARENT_RUN_FILE = "mlflow_parent_run_id"


class SweepParentRun(Callback):
    """Hydra callback: at the start of a multirun, create the sweep's parent MLflow run (and so the store and the
    experiment, once, before jobs could race on a fresh SQLite file); each job reads its id from the sweep folder
    and becomes a nested child (tag mlflow.parentRunId). At the end the parent is marked finished."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not config.logger.enabled:
            return
        import mlflow

        client = mlflow.tracking.MlflowClient(config.logger.tracking_uri)
        name = config.logger.experiment_name
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            name, artifact_location=config.logger.artifact_location)
        overrides = " ".join(config.hydra.overrides.task)
        run = client.create_run(experiment_id, run_name=config.run_name or f"sweep {overrides}".strip(),
                                tags={"sweep": "true", "sweep_dir": str(config.hydra.sweep.dir)})
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PARENT_RUN_FILE).write_text(run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = Path(config.hydra.sweep.dir) / PARENT_RUN_FILE
        if config.logger.enabled and path.exists():
            import mlflow

            mlflow.tracking.MlflowClient(config.logger.tracking_uri).set_terminated(path.read_text().strip())


def parent_run_id() -> str | None:
    """The sweep's parent run, when this job is part of a multirun."""
    from hydra.types import RunMode

    hydra_cfg = _hydra_config()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    path = Path(hydra_cfg.sweep.dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.exists() else None


def make_logger(cfg: DictConfig):
    """Lightning's MLFlowLogger for this job, with tags and params already logged; None when logging is off."""
    if not cfg.logger.enabled:
        return None
    from lightning.pytorch.loggers import MLFlowLogger

    tags = {g: cfg[g].get("name", "") for g in ("algorithm", "model", "prompt", "data", "reward") if g in cfg}
    tags.update(hydra_choices())
    tags["task"] = cfg.task
    tags["output_dir"] = str(cfg.output_dir)
    parent = parent_run_id()
    if parent:
        tags["mlflow.parentRunId"] = parent
    logger = MLFlowLogger(
        experiment_name=cfg.logger.experiment_name,
        tracking_uri=cfg.logger.tracking_uri,
        run_name=cfg.run_name or f"{tags['algorithm']}-{tags['prompt']}-{tags['model']}",
        tags=tags,
        artifact_location=cfg.logger.artifact_location,
    )
    params = {k: redact(v) for k, v in flatten(cfg).items()}
    logger.log_hyperparams(params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(redact(OmegaConf.to_yaml(cfg, resolve=True)))
        logger.experiment.log_artifact(logger.run_id, str(path))
    return logger


def log_table(logger, rows: list[dict], artifact_file: str) -> None:
    if logger is None or not rows:
        return
    def cell(value):  # MLflow tables take scalars; lists (choices) are written as text
        return value if value is None or isinstance(value, (int, float, str)) else str(value)

    columns = {key: [cell(row.get(key)) for row in rows] for key in rows[0]}
    logger.experiment.log_table(logger.run_id, data=columns, artifact_file=artifact_file)


def log_file(logger, path: str | Path, artifact_path: str | None = None) -> None:
    if logger is not None:
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def completions_callback(every_n_steps: int):
    """A callback that logs the module's latest sample completions as an MLflow table every N steps."""
    from lightning.pytorch.callbacks import Callback

    class LogCompletions(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            rows = getattr(module, "_sample_rows", None)
            step = trainer.global_step
            if rows and every_n_steps and (batch_idx % every_n_steps == 0):
                log_table(trainer.logger, rows, f"completions/step_{step:06d}.json")

    return LogCompletions()
