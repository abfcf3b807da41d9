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


_SECRET_KEYS = ("token", "password", "passwd", "secret", "api_key", "apikey", "credential")


def redact_param(key: str, value: object) -> object:
    """A param whose name says it holds a secret is never logged; URIs lose their passwords."""
    secret = any(word in key.lower() for word in _SECRET_KEYS) and value not in (None, "")
    return "***" if secret and not isinstance(value, (dict, list)) else redact(value)


def redacted(data: object, key: str = "") -> object:
    """A resolved config container with every secret redacted (for the config.yaml artifact)."""
    if isinstance(data, dict):
        return {k: redacted(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v, key) for v in data]
    return redact_param(key, data)


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
        client = _client(config.logger.tracking_uri)
        name = config.logger.experiment_name
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            name, artifact_location=config.logger.artifact_location)
        study = study_tags(config)
        run = _find_study_run(client, experiment_id, study) if study else None
        if run is not None:  # a resumed Optuna study keeps its parent run
            client.update_run(run.info.run_id, status="RUNNING")
        else:
            overrides = " ".join(config.hydra.overrides.task)
            default_name = f"study {study['optuna_study']}" if study else f"sweep {overrides}".strip()
            run = client.create_run(experiment_id, run_name=config.run_name or default_name,
                                    tags={"sweep": "true", "sweep_dir": str(config.hydra.sweep.dir), **(study or {})})
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PARENT_RUN_FILE).write_text(run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        end_sweep_run(config, "FINISHED")


def end_sweep_run(config: DictConfig, status: str) -> None:
    """Close the sweep's parent run (FINISHED, or FAILED when a job failed)."""
    parent = parent_run_id(config.hydra.sweep.dir)
    if config.logger.enabled and parent:
        _client(config.logger.tracking_uri).set_terminated(parent, status)


def _client(tracking_uri: str):
    import mlflow

    return mlflow.tracking.MlflowClient(tracking_uri)


def study_tags(config: DictConfig) -> dict[str, str] | None:
    """The tags that name an Optuna study's parent run (None for sweeps that are not Optuna studies)."""
    sweeper = config.hydra.sweeper
    if "study_name" not in sweeper:
        return None
    return {"optuna_study": str(sweeper.study_name), "optuna_storage": str(redact(sweeper.storage))}


def _find_study_run(client, experiment_id: str, tags: dict[str, str]):
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1,
                              order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def parent_run_id(sweep_dir: str | Path | None = None) -> str | None:
    """The sweep's parent run, when this job is part of a multirun (or of the sweep in `sweep_dir`)."""
    from hydra.types import RunMode

    if sweep_dir is None:
        hydra_cfg = _hydra_config()
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        sweep_dir = hydra_cfg.sweep.dir
    path = Path(sweep_dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.exists() else None


def record_failure(logger, error: BaseException) -> None:
    """Mark the job's run FAILED (KILLED on Ctrl-C) with the traceback as the artifact error.txt."""
    import traceback

    if logger is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "error.txt"
        path.write_text(redact("".join(traceback.format_exception(error))))
        logger.experiment.log_artifact(logger.run_id, str(path))
    logger.experiment.set_tag(logger.run_id, "error", redact(f"{type(error).__name__}: {error}")[:5000])
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    logger.experiment.set_terminated(logger.run_id, status)


def mark_trial(tracking_uri: str, run_id: str, state: str, reason: str = "") -> None:
    """The Optuna trial's final state on its MLflow run: tag optuna_state; a pruned run is KILLED, a failed
    one FAILED (a NaN objective fails a run that itself finished)."""
    client = _client(tracking_uri)
    client.set_tag(run_id, "optuna_state", state)
    if reason:
        client.set_tag(run_id, "optuna_reason", redact(reason)[:5000])
    if state in ("PRUNED", "FAIL"):
        client.set_terminated(run_id, "KILLED" if state == "PRUNED" else "FAILED")


def log_best_trial(tracking_uri: str, parent_id: str, metric: str, best) -> None:
    """The best trial so far on the study's parent run: its value as the metric `best/<metric>`, its number and
    params as tags `best_trial` and `best/<param>` (tags, not params: a resumed study can change its best)."""
    client = _client(tracking_uri)
    client.log_metric(parent_id, f"best/{metric}", best.value, step=best.number)
    client.set_tag(parent_id, "best_trial", str(best.number))
    for key, value in best.params.items():
        client.set_tag(parent_id, f"best/{key}", str(value))


def make_logger(cfg: DictConfig, run_id: str | None = None):
    """Lightning's MLFlowLogger for this job, with tags and params already logged; None when logging is off.
    With `run_id` (a resumed run) it continues that run: params and config were logged by the first attempt."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.loggers import MLFlowLogger

    if not cfg.logger.enabled or rank_zero_only.rank != 0:  # in DDP, rank 0 alone owns the run
        return None
    check_reachable(cfg.logger.tracking_uri)
    if run_id is not None:
        logger = MLFlowLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=cfg.logger.tracking_uri,
                              run_id=run_id)
        logger.experiment.update_run(run_id, status="RUNNING")
        logger.experiment.set_tag(run_id, "resumed_from", str(cfg.ckpt_path))
        return logger

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
        run_name=cfg.run_name or _default_run_name(cfg, tags),
        tags=tags,
        artifact_location=cfg.logger.artifact_location,
    )
    params = {k: redact_param(k, v) for k, v in flatten(cfg).items()}
    logger.log_hyperparams(params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(OmegaConf.to_yaml(redacted(OmegaConf.to_container(cfg, resolve=True))))
        logger.experiment.log_artifact(logger.run_id, str(path))
    return logger


def _default_run_name(cfg: DictConfig, tags: dict) -> str:
    name = f"{tags['algorithm']}-{tags['prompt']}-{tags['model']}"
    return f"trial-{cfg.trial}-{name}" if cfg.get("trial") is not None else name


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when an MLflow server does not answer (MLflow's own client would retry for
    minutes, after the model has loaded). Local stores (sqlite, file) need no check."""
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = re.sub(r"//[^/@]*@", "//", tracking_uri.rstrip("/"))  # credentials are not needed to see the host
    try:
        urllib.request.urlopen(url + "/health", timeout=timeout)
    except urllib.error.HTTPError:
        pass  # it answered (with an error status, e.g. 401 or 404): it is reachable
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"MLflow tracking server {redact(tracking_uri)} is unreachable ({reason}). Start it, point "
            f"MLFLOW_TRACKING_URI / logger.tracking_uri elsewhere, or run with logger=none.") from None


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
