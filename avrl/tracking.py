"""MLflow: one run per training or evaluation job (the job's logger), tagged with the Hydra choices, the resolved
config as params and as an artifact, sample completions as tables; a server that does not answer fails fast.
Sweeps' parent runs live in avrl/sweeps/parent_run.py."""

from __future__ import annotations

import os
import re
import tempfile
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from avrl.config import flatten, hydra_config
from avrl.db import require_driver
from avrl.redaction import redact, redact_param, redacted
from avrl.versions import version_tags

TAG_GROUPS = ("algorithm", "model", "prompt", "data", "reward", "trainer", "experiment", "sweep")
# MLflow 3's UI opens an experiment by its kind; unset, it files training runs under its GenAI pages.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# A sweep's folder holds its parent run's id (each job reads it to nest its run) and the tracking URI it logged to.
PARENT_RUN_FILE = "mlflow_parent_run_id"
TRACKING_URI_FILE = "mlflow_tracking_uri"  # credentials removed: the report reads it


def parent_run_id(sweep_dir: str | Path | None = None) -> str | None:
    """The sweep's parent run, when this job is part of a multirun (or of the sweep in `sweep_dir`)."""
    if sweep_dir is None:
        hydra_cfg = hydra_config()
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        sweep_dir = hydra_cfg.sweep.dir
    path = Path(sweep_dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.exists() else None


def training_experiment(client, logger_cfg: DictConfig) -> str:
    """The id of the logger's experiment, created if it does not exist (quietly: Lightning would warn), and tagged
    as a model-training one unless its kind was chosen already. Workers that start together on a fresh store race
    on both writes: the loser finds the winner's and goes on."""
    name = logger_cfg.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment = _settled(
            lambda: client.get_experiment(
                client.create_experiment(name, artifact_location=logger_cfg.artifact_location)
            ),
            lambda: client.get_experiment_by_name(name),
        )
    key, value = EXPERIMENT_KIND
    if key not in experiment.tags:
        _settled(
            lambda: client.set_experiment_tag(experiment.experiment_id, key, value),
            lambda: key in client.get_experiment(experiment.experiment_id).tags or None,
        )
    return experiment.experiment_id


def _settled(write, written):
    """`write()`, or, when it fails because another process wrote first, what `written()` finds instead (the
    error stands when nothing was written)."""
    try:
        return write()
    except MlflowException:
        found = written()
        if found is None:
            raise
        return found


def hydra_choices() -> dict[str, str]:
    hydra_cfg = hydra_config()
    if hydra_cfg is None:
        return {}
    choices = hydra_cfg.runtime.choices
    return {g: str(choices.get(g)) for g in TAG_GROUPS if choices.get(g) not in (None, "null")}


def sweep_arm() -> str:
    """What sets this sweep job apart from the others but the seed: its overrides without seed=/seeds= (the long
    form of the `arm` tag; `run_label` gives the short one)."""
    return " ".join(_arm_overrides()) or "default"


def _arm_overrides() -> list[str]:
    """The job's overrides but its seed, secrets masked (they name the run and tag it)."""
    hydra_cfg = hydra_config()
    overrides = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    return [redact(o) for o in overrides if _key(o) not in ("seed", "seeds")]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def varied_keys(sweep_dir) -> set[str] | None:
    """The keys a sweep varies: those given as sweeps (a,b / choice / range / interval) on its command line or in
    its preset's hydra.sweeper.params, read from <sweep dir>/multirun.yaml (the sweepers write it before the jobs
    start); None without that file, or when it cannot be read (the name then holds all the job's overrides)."""
    path = Path(sweep_dir) / "multirun.yaml"
    try:  # unresolved: an override may hold an interpolation (${seed}) that only the job can resolve
        hydra_cfg = OmegaConf.to_container(OmegaConf.load(path).hydra, resolve=False)
        params = hydra_cfg["sweeper"].get("params") or {}
        lines = [f"{k}={v}" for k, v in params.items()] + list(hydra_cfg["overrides"]["task"])
        return {_key(o.input_line) for o in OverridesParser.create().parse_overrides(lines) if o.is_sweep_override()}
    except Exception:  # noqa: BLE001 - a name is not worth failing the job for
        return None


# The leading parts of every sweep run's name; the seed ends it.
NAMED = ("algorithm", "prompt", "seed", "seeds", "trial")


def run_label(cfg: DictConfig, tags: dict) -> tuple[str, str]:
    """A sweep job's short arm label and run name: its method and prompt, the other overrides the sweep varies
    (value only for a config group, last key=value otherwise) and the seed, e.g. ("sft · no_think",
    "sft · no_think · seed 43"); an Optuna trial's number instead of its values. What tells the runs apart in the
    MLflow UI's name column."""
    trial = cfg.trial is not None
    varied = set() if trial else varied_keys(hydra_config().sweep.dir)  # a trial's values: its params
    parts = [f"trial {cfg.trial}"] if trial else []
    parts += [tags.get("algorithm", ""), tags.get("prompt", "")]
    for override in _arm_overrides():
        key, value = _key(override), override.split("=", 1)[-1]
        if key not in NAMED and key != "sweep" and (varied is None or key in varied):
            parts.append(value if "." not in key else f"{key.rsplit('.', 1)[1]}={value}")
    arm = " · ".join(p for p in parts if p)
    return arm, f"{arm} · seed {cfg.seed}"


def record_failure(logger, error: BaseException) -> None:
    """Mark the job's run FAILED (KILLED on Ctrl-C) with the traceback as the artifact error.txt."""
    if logger is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "error.txt"
        path.write_text(redact("".join(traceback.format_exception(error))))
        logger.experiment.log_artifact(logger.run_id, str(path))
    logger.experiment.set_tag(logger.run_id, "error", redact(f"{type(error).__name__}: {error}")[:5000])
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    logger.experiment.set_terminated(logger.run_id, status)


def make_logger(cfg: DictConfig, run_id: str | None = None):
    """Lightning's MLFlowLogger for this job, with tags and params already logged; None when logging is off.
    With `run_id` (a resumed run) it continues that run: params and config were logged by the first attempt."""
    if not cfg.logger.enabled or rank_zero_only.rank != 0:  # in DDP, rank 0 alone owns the run
        return None
    require_driver(cfg.logger.tracking_uri, "logger.tracking_uri")
    check_reachable(cfg.logger.tracking_uri)
    if run_id is not None:
        logger = MLFlowLogger(
            experiment_name=cfg.logger.experiment_name, tracking_uri=cfg.logger.tracking_uri, run_id=run_id
        )
        logger.experiment.update_run(run_id, status="RUNNING")
        logger.experiment.set_tag(run_id, "resumed_from", str(cfg.ckpt_path))
        return logger

    tags = {g: cfg[g].name for g in ("algorithm", "model", "prompt", "data", "reward") if g in cfg}
    tags.update(hydra_choices())
    tags["method"] = tags.get("algorithm", "")
    tags["seed"] = str(cfg.seed)
    tags["task"] = cfg.task
    tags["output_dir"] = str(cfg.output_dir)
    tags.update(slurm_tags())
    tags.update(version_tags())
    parent = parent_run_id()
    run_name = cfg.run_name or _default_run_name(cfg, tags)
    if parent:  # arm, seed, method, prompt, model: what the MLflow UI's "Group by" offers
        tags["mlflow.parentRunId"] = parent
        tags["arm"], name = run_label(cfg, tags)
        tags["arm_overrides"] = sweep_arm()
        run_name = cfg.run_name or name

    training_experiment(mlflow.tracking.MlflowClient(cfg.logger.tracking_uri), cfg.logger)
    logger = MLFlowLogger(
        experiment_name=cfg.logger.experiment_name,
        tracking_uri=cfg.logger.tracking_uri,
        run_name=run_name,
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


# What SLURM allocated to the job (sbatch/srun set these in every task): on the run, so that a run names its job
# and the resources behind its figures can be read next to them.
SLURM_VARIABLES = {
    "job_id": "SLURM_JOB_ID",
    "nodelist": "SLURM_JOB_NODELIST",
    "nnodes": "SLURM_NNODES",
    "ntasks": "SLURM_NTASKS",
    "ntasks_per_node": "SLURM_NTASKS_PER_NODE",
    "cpus_per_task": "SLURM_CPUS_PER_TASK",
    "gpus_on_node": "SLURM_GPUS_ON_NODE",
    "partition": "SLURM_JOB_PARTITION",
}


def slurm_tags() -> dict[str, str]:
    """slurm.<name> tags for a job running under SLURM (none elsewhere)."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {f"slurm.{name}": os.environ[var] for name, var in SLURM_VARIABLES.items() if var in os.environ}


def _default_run_name(cfg: DictConfig, tags: dict) -> str:
    name = f"{tags['algorithm']}-{tags['prompt']}-{tags['model']}"
    return f"trial-{cfg.trial}-{name}" if cfg.trial is not None else name


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when an MLflow server does not answer (MLflow's own client would retry for
    minutes, after the model has loaded). Local stores (sqlite, file) need no check."""
    reason = unanswered(tracking_uri, timeout)
    if reason is not None:
        raise ConnectionError(
            f"MLflow tracking server {redact(tracking_uri)} is unreachable ({reason}). Start it, point "
            f"MLFLOW_TRACKING_URI / logger.tracking_uri elsewhere, or run with logger=none."
        )


def unanswered(tracking_uri: str, timeout: float) -> object | None:
    """Why an http(s) tracking server does not answer its /health, or None when it answers (with any status: a
    401 or 404 is an answer) or the store is local."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    url = re.sub(r"//[^/@]*@", "//", tracking_uri.rstrip("/"))  # credentials are not needed to see the host
    try:
        urllib.request.urlopen(url + "/health", timeout=timeout)
    except urllib.error.HTTPError:
        pass  # it answered (with an error status): it is reachable
    except (urllib.error.URLError, OSError) as e:
        return getattr(e, "reason", e)
    return None


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

    class LogCompletions(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            rows = getattr(module, "_sample_rows", None)
            step = trainer.global_step
            if rows and every_n_steps and (batch_idx % every_n_steps == 0):
                log_table(trainer.logger, rows, f"completions/step_{step:06d}.json")

    return LogCompletions()
