"""Stopping for preemption and time limits without losing work: checkpoint at the next step boundary, then requeue.

SLURM warns a job before taking its node: submitit's SIGUSR2 (`--signal=USR2@<signal_delay_s>`, sent before the
time limit and on preemption), SIGUSR1 (a plain `sbatch --signal=USR1@90` script, Lightning's convention) and
SIGTERM (preemption, `scancel`, the time limit itself; SIGKILL follows after the cluster's KillWait). A signal
only sets a flag: the step running finishes, `StopOnSignal` saves `last.ckpt` there (every rank agrees on the step
through one all-reduce of a flag per step) and stops the Trainer. `train` then:
- SIGUSR1/SIGUSR2: marks the MLflow run SCHEDULED (tag `stopped`) and requeues the job: under submitit through
  its own handler (which counts time-outs against `max_num_timeout`), under a plain SLURM job with
  `scontrol requeue`. The requeued job starts again in the same folder and resumes (ckpt_path=auto) into the same
  MLflow run.
- SIGTERM: marks the run KILLED and exits; if SLURM requeues the job (preemption with PreemptMode=REQUEUE) it
  resumes the same way, and a `scancel`ed job stays stopped with its last checkpoint kept.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
REQUEUE = (signal.SIGUSR1, signal.SIGUSR2)


class Stopped(BaseException):
    """Raised out of the Trainer once the checkpoint is saved; `hand_over` then ends the run."""

    def __init__(self, number: int, stopper: "StopOnSignal"):
        super().__init__(signal.Signals(number).name)
        self.number, self.stopper = number, stopper


class StoppedForSignal(SystemExit):
    """The run's exit after a stop for a signal (exit status 1, the message on stderr)."""


class StopOnSignal(Callback):
    def __init__(self, checkpoint_path):
        self.checkpoint_path = str(checkpoint_path)
        self.received: int | None = None  # the signal number, set by the handler
        self.pending: int | None = None  # the signal the run stops for, its checkpoint saved
        self.previous: dict[int, object] = {}

    def on_train_start(self, trainer, module) -> None:
        """Installed after Lightning's own handlers (set up once on_fit_start has run), which they replace: under
        SLURM, Lightning's would save a checkpoint of its own at the signal, mid-step, and requeue the job a second
        time; its SIGTERM handling would stop the run before this checkpoint is written."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python installs signal handlers from the main thread only (a run inside a test thread)
        for number in SIGNALS:
            self.previous[number] = signal.signal(number, self._handle)

    def on_fit_end(self, trainer, module) -> None:
        self.restore()

    def on_exception(self, trainer, module, exception) -> None:
        if not isinstance(exception, Stopped):  # (hand_over restores them after a stop)
            self.restore()

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _handle(self, number, frame) -> None:
        self.received = number  # nothing else here: the interrupted code may hold a lock (logging's, say)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        """Saved where a periodic checkpoint is (this hook; checkpoint callbacks run after it)."""
        number = self._agreed(trainer)
        if number is None:
            return
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # the full state, to resume from
        self.pending = number
        if trainer.is_global_zero:
            log.warning(
                "stopping for %s at step %d; checkpoint %s",
                signal.Signals(number).name,
                trainer.global_step,
                self.checkpoint_path,
            )

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        """The run stops before the next step, once the saved step's metrics are logged, by raising Stopped:
        Lightning's own stop (should_stop) would validate once more first, moving the random generators, so
        that the resumed run would not be the uninterrupted one. (A last step's stop is its normal end.)"""
        if self.pending is not None:
            raise Stopped(self.pending, self)

    def _agreed(self, trainer) -> int | None:
        """The signal every rank stops for, as soon as any rank has one (0 = none); one tiny all-reduce a step."""
        if trainer.world_size == 1:
            return self.received
        flag = torch.tensor(self.received or 0, device=trainer.strategy.root_device)
        number = int(trainer.strategy.reduce(flag, reduce_op="max"))
        return number or None


def hand_over(stop: Stopped, logger) -> None:
    """After a stop for a signal: record it on the MLflow run, then requeue (USR1/USR2) or exit (TERM)."""
    number, stopper = stop.number, stop.stopper
    name = signal.Signals(number).name
    requeue = number in REQUEUE and "SLURM_JOB_ID" in os.environ
    if logger is not None:
        logger.experiment.set_tag(logger.run_id, "stopped", f"{name} (requeued)" if requeue else name)
        logger.experiment.set_terminated(logger.run_id, "SCHEDULED" if requeue else "KILLED")
    previous = stopper.previous.get(number)
    stopper.restore()
    if requeue and _is_submitits(previous):  # it saves its job for the requeue, requeues (counting time-outs
        try:  # against max_num_timeout) and exits
            previous(number, None)
        except Exception:  # submitit's "timed-out too many times": the job ends here
            if logger is not None:
                logger.experiment.set_terminated(logger.run_id, "FAILED")
            raise
    if requeue:
        subprocess.run(["scontrol", "requeue", slurm_job_id()], check=False)
    raise StoppedForSignal(
        f"stopped for {name} after saving {stopper.checkpoint_path}; "
        + (
            "the job is requeued and resumes from it"
            if requeue
            else "run the same command again (same output folder) to resume from it"
        )
    )


def slurm_job_id() -> str:
    """This SLURM job's id as scontrol and scancel take it: an array task's is <array job>_<task> (its own
    SLURM_JOB_ID is refused by them as an invalid job id)."""
    array = [os.environ.get(k) for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")]
    return "_".join(array) if all(array) else os.environ["SLURM_JOB_ID"]


def _is_submitits(handler) -> bool:
    """Whether a signal handler is submitit's (a bound method of its SignalHandler). Lightning's own SLURM handler
    is never called: it would save a second checkpoint of its own and requeue the job a second time."""
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")
