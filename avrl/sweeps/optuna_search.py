"""Optuna search: the search space read from Hydra's sweep syntax, the study in an RDB storage, and a trial seen
from inside a training job (intermediate values reported, pruning decided).

The Hydra sweeper plugin (hydra_plugins/avrl_sweepers/optuna_sweeper.py) drives the loop; everything it needs
that is not Hydra plumbing lives here, so it can be read and tested without Hydra.
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import threading
import warnings
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from avrl.db import lock, require_driver
from avrl.redaction import redact

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# ------------------------------------------------------------------------------------------------ search space
def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override: `choice(a, b)` / `a,b` -> categorical; `range(lo, hi, step)`
    -> int (float if a bound is a float), stop excluded as in Python; `interval(lo, hi)` -> float, int when both
    bounds are ints; `tag(log, ...)` makes a range or interval log-uniform."""
    sweep = override.value()
    log_scale = "log" in getattr(sweep, "tags", set())
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution([_plain(v, override) for v in sweep.list])
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        last = start + step * math.floor((stop - start - 1e-12) / step)
        if all(isinstance(x, int) for x in (start, stop, step)):
            return IntDistribution(int(start), int(last), log=log_scale, step=1 if log_scale else int(step))
        return FloatDistribution(start, last, step=None if log_scale else step, log=log_scale)
    if isinstance(sweep, IntervalSweep):
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ValueError(f"{override.input_line!r}: not a sweep Optuna can search (use choice, range or interval)")


def _plain(value: Any, override: Override) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{override.input_line!r}: Optuna choices must be numbers, strings, booleans or null")


def search_space(params: dict[str, str] | None, arguments: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The distributions to search and the fixed overrides every trial gets. `params` is the preset's
    `hydra.sweeper.params` (key -> sweep expression); command-line arguments come after it and win."""
    parser = OverridesParser.create()
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(lines):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.input_line
    return space, list(fixed.values())


_BARE = re.compile(r"^[\w.:/+\-]*$")


def as_override(key: str, value: Any) -> str:
    """`key=value` in Hydra's override grammar; strings that are not plain words are quoted."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str) and not _BARE.match(value):
        text = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    else:
        text = str(value)
    return f"{key}={text}"


# ------------------------------------------------------------------------------------------------ the study
def storage(
    url: str, heartbeat_interval: int | None = 60, grace_period: int | None = None, stale_trial_callback=None
) -> optuna.storages.BaseStorage:
    """An RDB storage (SQLite file, PostgreSQL, MySQL: any SQLAlchemy URL; a missing driver is named first). With
    heartbeats, a trial whose worker was killed is marked FAIL by the next worker after `grace_period` seconds
    instead of staying RUNNING forever; `stale_trial_callback(study, trial)` is then called."""
    require_driver(url, "hydra.sweeper.storage")
    # A database server restarted, or a connection it dropped: each connection is checked before use and replaced.
    engine = {} if url.startswith("sqlite") else {"engine_kwargs": {"pool_pre_ping": True}}
    if heartbeat_interval:
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period or 2 * heartbeat_interval,
                heartbeat_stale_trial_callback=stale_trial_callback,
                **engine,
            )
    return optuna.storages.RDBStorage(url, **engine)


def study_lock(storage_url: str, study_name: str):
    """The study's lock in its own database (avrl/db.py): held while a worker counts the trials and asks for the
    next one, and while it finds or creates the study's parent MLflow run, so that workers take these in turn."""
    return lock(storage_url, f"avrl optuna study {study_name}")


def make_pruner(cfg) -> optuna.pruners.BasePruner:
    """The pruner from its config (`_target_` and arguments); none: never prune."""
    return instantiate(cfg) if cfg else optuna.pruners.NopPruner()


def make_sampler(cfg, trials_so_far: int = 0) -> optuna.samplers.BaseSampler | None:
    """The sampler from its config. A seeded sampler is seeded with seed + the number of trials already in the
    study: a resumed study must not replay the random start-up trials it already ran."""
    if cfg is None:
        return None
    cfg = OmegaConf.create(cfg)
    if cfg.get("seed") is not None:
        cfg.seed = int(cfg.seed) + trials_so_far
    return instantiate(cfg)


def open_study(name: str, storage_: optuna.storages.BaseStorage, direction: str, sampler_cfg, pruner_cfg):
    """Create the study, or load it to resume when it already exists in the storage."""
    optuna.create_study(study_name=name, storage=storage_, direction=direction, load_if_exists=True)
    trials_so_far = len(storage_.get_all_trials(storage_.get_study_id_from_name(name), deepcopy=False))
    return optuna.load_study(
        study_name=name,
        storage=storage_,
        sampler=make_sampler(sampler_cfg, trials_so_far),
        pruner=make_pruner(pruner_cfg),
    )


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards `n_trials`: finished ones and those other workers are running now (a trial whose
    worker stopped sending heartbeats is failed first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
    return sum(RETRIED not in t.user_attrs for t in trials)  # a retried trial counts once: as its retry


# A trial whose job the cluster took away (not its own fault) is asked again with the same parameters, up to
# MAX_ATTEMPTS in all: the failed one gets RETRIED (it no longer counts towards n_trials), the retry RETRY_OF.
RETRIED, RETRY_OF, ATTEMPT = "retried", "retry_of", "attempt"
MAX_ATTEMPTS = 3
CLUSTER_ENDED = ("PREEMPTED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def ended_by_the_cluster(error: BaseException | None) -> bool:
    """Preemption, a time limit (also after submitit's requeues ran out), a node failure."""
    return error is not None and (
        getattr(error, "state", "") in CLUSTER_ENDED or "timed-out too many times" in str(error)
    )


def retry(study: optuna.Study, trial: optuna.Trial, error: BaseException | None) -> bool:
    """Enqueue the same parameters again when the cluster ended the trial's job; whether it did."""
    attempt = int(trial.user_attrs.get(ATTEMPT, 1))
    if not ended_by_the_cluster(error) or attempt >= MAX_ATTEMPTS:
        return False
    first = trial.user_attrs.get(RETRY_OF, trial.number)
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF: first, ATTEMPT: attempt + 1})
    trial.set_user_attr(RETRIED, True)
    log.warning(
        "trial %d: the cluster ended its job (%s); its parameters are asked again (attempt %d of %d)",
        trial.number,
        redact(str(error))[:200],
        attempt + 1,
        MAX_ATTEMPTS,
    )
    return True


def cancel_job(trial) -> None:
    """Cancel the SLURM job of a trial failed as stale (its worker is gone; the job would run on for nothing)."""
    job = trial.user_attrs.get("slurm_job")
    if job:
        out = subprocess.run(["scancel", str(job)], capture_output=True, text=True)
        log.warning(
            "trial %d: its SLURM job %s cancelled%s",
            trial.number,
            job,
            "" if out.returncode == 0 else f" (scancel: {out.stderr.strip()[:200]})",
        )


def ask(study: optuna.Study, space: dict[str, BaseDistribution]) -> optuna.Trial:
    """A new trial. Optuna warns that storage heartbeats are meant for its own `optimize` loop; this sweeper records
    them itself (Heartbeat), so the warning is not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask(space)


class Heartbeat:
    """Records the trial's heartbeat every `interval` seconds while its job runs (Optuna does this itself only
    inside `study.optimize`, which a sweeper that launches Hydra jobs cannot use)."""

    def __init__(self, storage_: optuna.storages.BaseStorage, trial_id: int, interval: int | None):
        self.storage, self.trial_id, self.interval = storage_, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        """A database blip (a restart, a dropped connection) must not end the heartbeats: another worker would then
        fail this live trial as stale and its result would be thrown away. Failed beats are retried sooner, with
        backoff (1, 2, 4 ... s, never longer than the interval), and logged; the next good one says so."""
        failures = 0
        while not self._stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as error:
                failures += 1
                wait = min(float(self.interval), 2.0 ** (failures - 1))
                log.warning(
                    "heartbeat of trial %d not recorded (%s: %s); retrying in %.0f s",
                    self.trial_id,
                    type(error).__name__,
                    redact(str(error))[:300],
                    wait,
                )
                self._stop.wait(wait)
                continue
            if failures:
                log.warning("heartbeat of trial %d recorded again after %d failed attempts", self.trial_id, failures)
                failures = 0
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.interval and isinstance(self.storage, optuna.storages.RDBStorage):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def outcome(value: Any, error: BaseException | None) -> tuple[TrialState, float | None, str]:
    """How a finished job ends its trial: COMPLETE with a finite value, PRUNED, or FAIL with the reason."""
    if isinstance(error, optuna.TrialPruned):
        return TrialState.PRUNED, None, str(error)
    if error is not None:
        return TrialState.FAIL, None, f"{type(error).__name__}: {error}"
    if value is None:
        return TrialState.FAIL, None, "the job returned no objective value (is `objective` a logged metric?)"
    value = float(value)
    if not math.isfinite(value):
        return TrialState.FAIL, None, f"the objective is {value}"
    return TrialState.COMPLETE, value, ""


# ------------------------------------------------------------------------------------------------ inside a job
def job_trial(trial_number: int | None) -> optuna.Trial | None:
    """The Optuna trial this job runs, when it was launched by the Optuna sweeper (`trial=<number>`); the study's
    name and storage come from the running Hydra config (hydra.sweeper), so no URL travels in an override."""
    if trial_number is None or not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    if "study_name" not in sweeper:
        return None
    store = optuna.storages.RDBStorage(sweeper.storage)
    # Pruners live in the sweeper's config, not in the storage: the job builds the same one.
    study = optuna.load_study(study_name=sweeper.study_name, storage=store, pruner=make_pruner(sweeper.pruner))
    study_id = store.get_study_id_from_name(sweeper.study_name)
    return optuna.trial.Trial(study, store.get_trial_id_from_study_id_trial_number(study_id, int(trial_number)))


def pruning_callback(trial: optuna.Trial, metric: str):
    """A Lightning callback that reports `metric` to the trial after each validation and stops training when
    the study's pruner says so; `pruned_at` is then the step it stopped at."""

    class ReportToTrial(Callback):
        pruned_at: int | None = None

        def on_validation_end(self, trainer, module) -> None:
            if trainer.sanity_checking or metric not in trainer.callback_metrics:
                return
            prune = False
            if trainer.is_global_zero:
                trial.report(float(trainer.callback_metrics[metric]), step=trainer.global_step)
                prune = trial.should_prune()
            if trainer.strategy.broadcast(prune):  # every rank stops together
                self.pruned_at = trainer.global_step
                trainer.should_stop = True

    return ReportToTrial()
