"""`hydra/sweeper=avrl_optuna`, selected by the presets in sweeps/search/ (`python run.py -m search=grpo_optuna`).

Why not hydra-optuna-sweeper: its last release (1.3.0) needs optuna < 3, whose RDB storage fails under the
SQLAlchemy 2 that MLflow brings, and it cannot prune. This one is an ask/tell loop over Hydra jobs on Optuna >= 4.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from avrl.redaction import redact, scrub
from avrl.sweeps import optuna_search as search
from avrl.sweeps import parent_run
from avrl.sweeps import summary as sweep

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name: str,
        storage: str,
        direction: str,
        n_trials: int,
        sampler: Any = None,
        pruner: Any = None,
        params: dict | None = None,
        enqueue_trials: list | None = None,
        heartbeat_interval: int | None = 60,
    ):
        self.study_name, self.storage_url, self.direction = study_name, storage, direction
        self.n_trials, self.sampler_cfg, self.pruner_cfg = n_trials, sampler, pruner
        self.params = params or {}
        self.enqueue = [dict(t) for t in (enqueue_trials or [])]
        self.heartbeat_interval = heartbeat_interval

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[dict]:
        space, fixed = search.search_space(OmegaConf.to_container(self.params), arguments)
        if not space:
            raise ValueError(
                "nothing to search: give hydra.sweeper.params (see sweeps/search/) or sweep overrides "
                "such as optim.lr='tag(log, interval(1e-6, 1e-4))'"
            )
        store = search.storage(self.storage_url, self.heartbeat_interval, stale_trial_callback=self._worker_lost)
        study = search.open_study(self.study_name, store, self.direction, self.sampler_cfg, self.pruner_cfg)
        for params in self.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        scrub(sweep_dir)  # the overrides as given, secrets included (the storage URL's password)
        log.info(
            "Optuna study %r in %s: %d of %d trials done",
            self.study_name,
            redact(self.storage_url),
            search.counted_trials(study),
            self.n_trials,
        )

        rows = []
        while (trial := self._next_trial(study, space)) is not None:
            rows.append(self._run_trial(study, store, trial, fixed))

        self._finish(study, rows, sweep_dir)
        return rows

    def _next_trial(self, study, space):
        """A new trial, or None once the study holds n_trials (finished or running). Counting and asking happen
        under the study's lock in its database, so workers sharing the storage never start more than n_trials."""
        with search.study_lock(self.storage_url, self.study_name):
            if search.counted_trials(study) >= self.n_trials:
                return None
            return search.ask(study, space)

    def _worker_lost(self, study, trial) -> None:
        """Optuna failed a trial whose worker stopped sending heartbeats (killed, or its machine lost): its MLflow
        run, left RUNNING by the dead job, is marked FAILED with the reason."""
        reason = "its worker stopped sending heartbeats (killed, or its machine lost)"
        log.warning("trial %d FAIL: %s", trial.number, reason)
        search.cancel_job(trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.config.logger.enabled:
            parent_run.mark_trial(self.config.logger.tracking_uri, run_id, "FAIL", reason)

    def _run_trial(self, study, store, trial, fixed) -> dict:
        overrides = fixed + [search.as_override(k, v) for k, v in trial.params.items()] + [f"trial={trial.number}"]
        trial_id = store.get_trial_id_from_study_id_trial_number(
            store.get_study_id_from_name(self.study_name), trial.number
        )
        value, error = None, None
        with search.Heartbeat(store, trial_id, self.heartbeat_interval):
            try:
                (ret,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
                if ret.status == JobStatus.COMPLETED:
                    value = ret.return_value
                else:
                    error = ret._return_value  # the exception the job raised
            except Exception as e:  # the overrides did not compose, e.g. an unknown config option
                error = e
        state, value, reason = search.outcome(value, error)
        stored = store.get_trial(trial_id)  # the job has set its mlflow_run_id (avrl/train.py)
        if stored.state.is_finished():  # another worker failed it: its heartbeats came late
            reason = (
                f"another worker marked this trial FAIL while it ran (no heartbeat for over "
                f"{2 * (self.heartbeat_interval or 0)} s; raise hydra.sweeper.heartbeat_interval)"
            )
            log.warning("trial %d: %s; its result (%s) is not recorded", trial.number, reason, state.name)
            state, value = optuna.trial.TrialState.FAIL, None
        else:
            if reason:
                trial.set_user_attr("reason", redact(reason)[:2000])
                log.warning("trial %d %s: %s", trial.number, state.name, reason)
            if state == optuna.trial.TrialState.FAIL:
                search.retry(study, trial, error)  # preempted or out of time: the same parameters again
            study.tell(trial, value, state)
        run_id = stored.user_attrs.get("mlflow_run_id")
        if run_id and self.config.logger.enabled:
            parent_run.mark_trial(self.config.logger.tracking_uri, run_id, state.name, reason)
        return sweep.job_row(trial.number, state.name, overrides, value, reason or None, mlflow_run_id=run_id)

    def _finish(self, study, rows: list[dict], sweep_dir: Path) -> None:
        sweep.write_summary(sweep_dir, rows, self.config.objective)
        scrub(sweep_dir, pickles=True)
        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if completed:
            best = study.best_trial
            print(f"best trial #{best.number}: {self.config.objective} = {best.value:.4f} with {best.params}")
            parent = parent_run.parent_run_id(sweep_dir)
            if parent and self.config.logger.enabled:
                parent_run.log_best_trial(self.config.logger.tracking_uri, parent, self.config.objective, best)
        print(f"dashboard: optuna-dashboard {redact(self.storage_url)}")
        if rows and not any(r["status"] in ("COMPLETE", "PRUNED") for r in rows):
            parent_run.write_sweep_report(self.config)  # (on_multirun_end, which writes it, is not reached)
            parent_run.end_sweep_run(self.config, "FAILED")
            raise sweep.SweepFailed(f"all {len(rows)} trials of this invocation failed; see the summary above")
