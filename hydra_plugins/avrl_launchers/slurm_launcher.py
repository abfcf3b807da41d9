"""avrl's SLURM launcher (`hydra/launcher=slurm`): Hydra's submitit launcher, made to outlive its jobs.

- A cell that finished already (its folder's run_info.json holds its result: avrl/resume.py) is not submitted
  again: running the same sweep command into the same `hydra.sweep.dir` runs only the cells that did not finish,
  each resuming from its own checkpoint (ckpt_path=auto).
- Jobs are followed through their result files and `squeue`, never waited for forever: a job that has left the
  queue without a result (cancelled, killed for memory, its node failed, out of time for good) becomes a FAILED
  job whose error holds SLURM's state and reason (`scontrol show job`, or `sacct` where accounting is on), within
  LEFT_QUEUE_GRACE_S, with or without accounting. A requeued job is PENDING in the queue, and waited for.
- A job that raised, or left, is a FAILED JobReturn like any other, so the sweeper collects the others and writes
  its summary and report; its MLflow run, if the job left it RUNNING, is marked KILLED or FAILED.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import mlflow
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from avrl.redaction import redact
from avrl.resume import differing_overrides, run_info

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # no slurm extra: Hydra imports every plugin module, so this one must import without it
    from hydra.plugins.launcher import Launcher as SlurmLauncher  # (hydra/launcher=slurm then names the extra)

log = logging.getLogger(__name__)
LEFT_QUEUE_GRACE_S = 60.0  # a job gone from squeue gets this long for its result file to appear (shared filesystems)
POLL_S = 2.0
KILLED_STATES = ("CANCELLED", "PREEMPTED")


class SlurmJobLeft(RuntimeError):
    """A SLURM job that left the queue without a result; `state` is SLURM's JobState (CANCELLED, OUT_OF_MEMORY,
    NODE_FAIL, TIMEOUT, ...)."""

    def __init__(self, job_id: str, state: str, reason: str):
        state = "NO_RESULT" if state == "COMPLETED" else state  # (its result file never appeared)
        super().__init__(f"SLURM job {job_id} ended {state}" + (f" ({reason})" if reason else "") + " without a result")
        self.job_id, self.state, self.reason = job_id, state, reason


class AvrlSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns: list[JobReturn | None] = [None] * len(job_overrides)
        to_run = []
        for k, overrides in enumerate(job_overrides):
            folder = self._job_dir(overrides, initial_job_idx + k)
            done = _completed(folder, overrides)
            if done is not None:
                log.info("\t#%d : finished before, not submitted again (%s)", initial_job_idx + k, folder)
                returns[k] = _finished(overrides, folder, done.get(str(self.config.objective)))
            else:
                to_run.append(k)
        if to_run:
            for k, ret in zip(
                to_run,
                self._submit_and_collect([job_overrides[k] for k in to_run], [initial_job_idx + k for k in to_run]),
                strict=True,
            ):
                returns[k] = ret
        return returns

    def _submit_and_collect(self, job_overrides, numbers) -> list[JobReturn]:
        import submitit  # the slurm extra: only hydra/launcher=slurm gets here

        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params.get("max_num_timeout", 0),
        )
        skip = {"submitit_folder", "max_num_timeout"}
        executor.update_parameters(**{_executor_key(k): v for k, v in self.params.items() if k not in skip})
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        for number, overrides in zip(numbers, job_overrides, strict=True):
            log.info("\t#%d : %s", number, " ".join(redact(o) for o in filter_overrides(overrides)))
        jobs = executor.map_array(
            self,
            *zip(
                *[
                    (list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state())
                    for o, n in zip(job_overrides, numbers, strict=True)
                ]
            ),
        )
        returns = []
        for job, overrides, number, outcome in zip(jobs, job_overrides, numbers, follow(jobs), strict=True):
            if outcome is None:
                try:
                    returns.append(job.results()[0])
                    continue
                except Exception as error:  # the job raised: submitit hands its traceback over
                    outcome = error
            self._close_run(self._job_dir(overrides, number), outcome)
            ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
            ret.return_value = outcome
            returns.append(ret)
        return returns

    def _job_dir(self, overrides, number: int) -> Path:
        """The output folder Hydra gives job `number` (hydra.sweep.dir / hydra.sweep.subdir, resolved)."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.num = number
        return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)

    def _close_run(self, folder: Path, outcome: BaseException) -> None:
        """The MLflow run of a job that did not finish, left RUNNING (or SCHEDULED for a requeue that never came):
        KILLED where SLURM cancelled or preempted it, FAILED otherwise."""
        run_id = (
            json.loads((folder / "run_info.json").read_text()).get("mlflow_run_id")
            if (folder / "run_info.json").exists()
            else None
        )
        if not run_id or not self.config.logger.enabled:
            return
        try:
            client = mlflow.tracking.MlflowClient(str(self.config.logger.tracking_uri))
            if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
                status = "KILLED" if getattr(outcome, "state", "") in KILLED_STATES else "FAILED"
                client.set_tag(run_id, "error", str(outcome)[:5000])
                client.set_terminated(run_id, status)
        except Exception as error:  # the tracking server is down: the summary still says what happened
            log.warning("could not mark the MLflow run %s of %s: %s", run_id, folder, error)


def follow(jobs) -> list[BaseException | None]:
    """Wait for every job: None for one that wrote its result, SlurmJobLeft for one that left the queue without."""
    outcomes: dict[int, BaseException | None] = {}
    gone_since: dict[int, float] = {}
    while len(outcomes) < len(jobs):
        for k, job in enumerate(jobs):
            if k in outcomes:
                continue
            if job.paths.result_pickle.exists():
                outcomes[k] = None
            elif queued(job.job_id) is False:
                gone_since.setdefault(k, time.monotonic())
                if time.monotonic() - gone_since[k] > LEFT_QUEUE_GRACE_S and not job.paths.result_pickle.exists():
                    outcomes[k] = SlurmJobLeft(job.job_id, *final_state(job.job_id))
                    job.paths.submitted_pickle.unlink(missing_ok=True)  # (it holds the overrides, secrets too)
            else:
                gone_since.pop(k, None)
        if len(outcomes) < len(jobs):
            time.sleep(POLL_S)
    return [outcomes[k] for k in range(len(jobs))]


def queued(job_id: str) -> bool | None:
    """Whether SLURM still holds the job (pending, running, requeued); None when squeue cannot tell (the
    controller is down: nothing is concluded from that)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    if out.returncode == 0:
        return bool(out.stdout.strip())
    return False if "invalid job id" in out.stderr.lower() else None


def final_state(job_id: str) -> tuple[str, str]:
    """(JobState, Reason) of a finished job: from slurmctld's memory of it (MinJobAge, 300 s by default), else
    from accounting; ("UNKNOWN", why) when neither knows."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    fields = dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)
    if out.returncode == 0 and "JobState" in fields:
        reason = fields.get("Reason", "None")
        return fields["JobState"], "" if reason == "None" else reason
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,Reason"], capture_output=True, text=True
    )
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    if line:
        state, _, reason = line.partition("|")
        return state.split()[0], "" if reason == "None" else reason
    return "UNKNOWN", "no record left in slurmctld or accounting"


def _completed(folder: Path, overrides) -> dict | None:
    """The result recorded in a job's folder by a finished run of the same overrides (avrl/resume.py), or None."""
    info = run_info(folder)
    if "completed" not in info or differing_overrides(info.get("overrides"), [redact(o) for o in overrides]):
        return None
    return info["completed"]


def _finished(overrides, folder: Path, value: Any) -> JobReturn:
    ret = JobReturn(overrides=list(overrides), working_dir=str(folder), status=JobStatus.COMPLETED)
    ret.return_value = value
    return ret


def _executor_key(key: str) -> str:
    """submitit's name of a launcher option (Hydra's launcher does the same mapping)."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf  # the slurm extra, as above

    return key if key in OmegaConf.structured(BaseQueueConf).keys() else f"slurm_{key}"
