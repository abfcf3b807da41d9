"""The MLflow side of a sweep: one parent run per multirun or Optuna study (created before the jobs start, closed at the
end, FAILED if a job failed), each job a nested child; Optuna trial states and the best trial on the runs."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from avrl import db
from avrl.atomic import write_atomic
from avrl.redaction import redact
from avrl.sweeps import optuna_search
from avrl.sweeps.base_row import evaluate_base
from avrl.sweeps.report import write_report
from avrl.tracking import PARENT_RUN_FILE, TRACKING_URI_FILE, check_reachable, parent_run_id, training_experiment
from avrl.versions import version_tags


class SweepNotStarted(SystemExit):
    """A SystemExit, so that Hydra's callback runner (which warns about any Exception and goes on) stops the sweep;
    the message goes to stderr and the exit status is 1."""


class SweepParentRun(Callback):
    """Hydra callback: at the start of a multirun, create the sweep's parent MLflow run (and so the store and the
    experiment, once, before jobs could race on a fresh SQLite file); each job reads its id from the sweep folder
    and becomes a nested child (tag mlflow.parentRunId). At the end the parent is marked finished."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not config.logger.enabled:
            return
        # Hydra turns a callback's exception into a warning and runs the jobs anyway, each then a top-level run
        # outside the sweep (or failing on the same store): stop the sweep here instead, before any job starts.

        study = study_tags(config)
        try:
            db.require_driver(config.logger.tracking_uri, "logger.tracking_uri")
            if study:
                db.require_driver(config.hydra.sweeper.storage, "hydra.sweeper.storage")
            check_reachable(config.logger.tracking_uri)
        except (ValueError, ImportError, ConnectionError) as error:
            raise SweepNotStarted(f"no job was started: {error}") from None
        try:
            self._start(config, study)
        except Exception as error:  # noqa: BLE001 - re-raised as the sweep's exit
            raise SweepNotStarted(
                f"the sweep's MLflow parent run could not be created, so no job was started: "
                f"{type(error).__name__}: {redact(str(error))}"
            ) from error

    def _start(self, config: DictConfig, study: dict | None) -> None:
        if study:
            # Workers started together on one study set up its experiment and its one parent in turn.
            with optuna_search.study_lock(config.hydra.sweeper.storage, config.hydra.sweeper.study_name):
                run = _parent_run(config, study)
        else:
            run = _parent_run(config, None)
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / PARENT_RUN_FILE, run.info.run_id)
        write_atomic(folder / TRACKING_URI_FILE, redact(absolute_sqlite(config.logger.tracking_uri)))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        write_base_row(config)
        write_sweep_report(config)
        if study_tags(config) and _trials_running(config):
            return  # other workers are still in the study: the last one to end closes its parent
        end_sweep_run(config, "FINISHED")


def _trials_running(config: DictConfig) -> bool:
    """Whether the Optuna study has trials running now (other workers'; this worker's are finished)."""
    store = optuna_search.storage(config.hydra.sweeper.storage, heartbeat_interval=None)
    trials = store.get_all_trials(
        store.get_study_id_from_name(config.hydra.sweeper.study_name),
        deepcopy=False,
        states=(optuna.trial.TrialState.RUNNING,),
    )
    return bool(trials)


def _parent_run(config: DictConfig, study: dict | None):
    """A new parent run; for an Optuna study, the study's parent when it has one (a resumed study, or one that
    other workers run too), set RUNNING again."""

    client = _client(config.logger.tracking_uri)
    experiment_id = training_experiment(client, config.logger)
    run = _find_study_run(client, experiment_id, study) if study else None
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        return run
    given = [redact(o) for o in config.hydra.overrides.task]  # the command line, secrets masked
    overrides = " ".join(given)
    default_name = f"study {study['optuna_study']}" if study else sweep_name(given)
    return client.create_run(
        experiment_id,
        run_name=config.run_name or default_name,
        tags={
            "sweep": "true",
            "sweep_dir": str(config.hydra.sweep.dir),
            **(study or {}),
            "sweep_overrides": overrides,
            **version_tags(),
        },
    )


def sweep_name(overrides: list[str]) -> str:
    """The parent run's name: the sweep preset and what the command line sweeps, short enough for the MLflow UI's
    name column, e.g. "sweep rl_vs_sft · algorithm=grpo,sft · seeds=2" (every override is in tag sweep_overrides)."""
    parts = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if key == "sweep" or override.is_sweep_override() or (key == "seeds" and override.value() != 1):
            parts.append(override.value() if key == "sweep" else override.input_line)
    return ("sweep " + " · ".join(parts)).strip()


def write_base_row(config: DictConfig) -> None:
    """The sweep's base row (avrl/sweeps/base_row.py: the base model evaluated once, its metrics on the parent run),
    before the report that measures retention from it; not for an Optuna study (no arms to compare), nor with
    final_eval.base_row=false. One that cannot be evaluated is a warning, not a failed sweep."""
    parent = parent_run_id(config.hydra.sweep.dir)
    wanted = OmegaConf.select(config, "final_eval.base_row", default=False)
    if not config.logger.enabled or not parent or not wanted or study_tags(config):
        return
    if on_cluster(config):  # the submitting node (a login node) is no place to load the base model
        logging.getLogger(__name__).warning(
            "the base row is not evaluated on the node that submitted the jobs; on a machine with an accelerator: "
            "python -m avrl.sweeps.base_row %s (then python -m avrl.sweeps.report %s)",
            config.hydra.sweep.dir,
            config.hydra.sweep.dir,
        )
        return
    try:
        evaluate_base(config, config.hydra.sweep.dir, config.logger.tracking_uri)
    except Exception as error:  # noqa: BLE001 - the sweep's jobs are done; say why and go on
        logging.getLogger(__name__).warning(
            "the base row was not evaluated (%s: %s); rerun: python -m avrl.sweeps.base_row %s",
            type(error).__name__,
            redact(str(error)),
            config.hydra.sweep.dir,
        )


def on_cluster(config: DictConfig) -> bool:
    """Whether the sweep's jobs ran elsewhere than this process's machine (the SLURM launcher)."""
    return "slurm" in str(OmegaConf.select(config, "hydra.launcher._target_", default="")).lower()


def write_sweep_report(config: DictConfig) -> None:
    """The ablation report (avrl/sweeps/report.py), written when a multirun ends (also when jobs failed), and the
    address of the parent run in the MLflow UI; a report that cannot be written is a warning, not a failed sweep
    (rerun it with python -m avrl.sweeps.report <sweep dir>)."""

    parent = parent_run_id(config.hydra.sweep.dir)
    if not config.logger.enabled or not parent:
        return
    log = logging.getLogger(__name__)
    try:
        written = write_report(config.hydra.sweep.dir, config.logger.tracking_uri)
        log.info("ablation report: %s", written[0])
    except Exception as error:  # noqa: BLE001 - the sweep's jobs are done; say why and go on
        log.warning(
            "the ablation report was not written (%s: %s); rerun: python -m avrl.sweeps.report %s",
            type(error).__name__,
            error,
            config.hydra.sweep.dir,
        )
    uri = redact(absolute_sqlite(config.logger.tracking_uri))
    experiment = _client(config.logger.tracking_uri).get_run(parent).info.experiment_id
    print(
        f"MLflow: the sweep's parent run (the comparison; its runs are nested under it): "
        f"{run_url(uri, experiment, parent)}"
    )
    if not uri.startswith(("http://", "https://")):
        print(f"  view with: mlflow ui --backend-store-uri {uri}")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where the MLflow UI shows a run: on the tracking server itself; for a local store (SQLite, a folder), on the
    address `mlflow ui` serves by default."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page}"


def absolute_sqlite(uri: str) -> str:
    """sqlite:///relative.db made absolute (relative to the directory the sweep ran in), so that the report can be
    rerun from anywhere; every other URI unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def end_sweep_run(config: DictConfig, status: str) -> None:
    """Close the sweep's parent run (FINISHED, or FAILED when a job failed)."""
    parent = parent_run_id(config.hydra.sweep.dir)
    if config.logger.enabled and parent:
        _client(config.logger.tracking_uri).set_terminated(parent, status)


def _client(tracking_uri: str):
    return mlflow.tracking.MlflowClient(tracking_uri)


def study_tags(config: DictConfig) -> dict[str, str] | None:
    """The tags that name an Optuna study's parent run (None for sweeps that are not Optuna studies)."""
    sweeper = config.hydra.sweeper
    if "study_name" not in sweeper:
        return None
    return {"optuna_study": str(sweeper.study_name), "optuna_storage": str(redact(sweeper.storage))}


def _find_study_run(client, experiment_id: str, tags: dict[str, str]):
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = client.search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time ASC"]
    )
    return runs[0] if runs else None


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
