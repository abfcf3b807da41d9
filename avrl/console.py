"""A console without noise: what `python run.py` prints is where outputs go, val/accuracy as it moves, the MLflow
run, and real warnings. Each line once; the libraries' tips, deprecation notices about their own internals and
CPU-only hardware notes are dropped here (and only here).

`quiet()` runs at the start of every `python run.py` job (after Hydra has set up logging); `progress_bar()` is the
training bar (steps, not "Epoch 0/-2", and no v_num).
"""

from __future__ import annotations

import logging
import os
import warnings

# Python warnings from libraries about their own code, not the user's (message regexes).
LIBRARY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # torch's pytree API, used by Lightning
    r"You have overridden `transfer_batch_to_device`",  # avrl's module moves its batches (items are not tensors)
    r"`is_gradient_checkpointing` is deprecated",  # PEFT reading a transformers attribute
    # GRPO steps its optimizer by hand and checkpoints the state after the step on purpose (what resume needs);
    # Lightning said so with a code sample at every checkpoint.
    r"Using ModelCheckpoint with manual optimization",
    # Lightning on any machine with SLURM's client installed (a login node); avrl's jobs reach SLURM through
    # hydra/launcher=slurm, which starts them with srun.
    r"The `srun` command is available on your system but is not used",
    # Resuming mid-epoch: Lightning cannot see that avrl's sampler skips the batches already trained on
    # (avrl.resume.EpochSampler; tests/test_resume.py checks the resumed run ends where an uninterrupted one ends).
    r"You're resuming from a checkpoint that ended before the epoch ended",
)
# Log records dropped, by logger name and a substring of the message.
NOISE = {
    "lightning.pytorch.utilities.rank_zero": ("litlogger", "available: False"),  # a tip; "GPU available: False"
    "DeepSpeed": ("Setting accelerator to CPU",),  # said on import on every CPU machine
}


_QUIET = [False]


def quiet() -> None:
    if _QUIET[0]:  # a sweep runs its jobs in one process
        return
    _QUIET[0] = True
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning attaches its own stream handlers on import (`lightning` always; `lightning.pytorch` when logging
    # is not configured yet): every Lightning line then came twice, once through Hydra's handler. Imported here
    # first, then one handler is left: Hydra's.
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for name, fragments in NOISE.items():
        logging.getLogger(name).addFilter(lambda record, f=fragments: not any(x in record.getMessage() for x in f))
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("compilers.C.base").setLevel(logging.WARNING)  # the gcc lines of DeepSpeed's CPU op builds


def resuming() -> None:
    """A resumed run writes into its own checkpoint folder: Lightning's "exists and is not empty" is expected."""
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def quiet_launcher() -> None:
    """The sweep process's own console, with hydra/launcher=slurm (called when run.py is imported, before Hydra
    starts). submitit prints each of its messages three times (its stdout and stderr handlers, then Hydra's), and
    on a cluster without SLURM accounting it warns at every poll that sacct failed: once through Hydra's handler,
    and that warning once, saying what it means."""
    os.environ.setdefault("SUBMITIT_LOG_LEVEL", "NOCONFIG")  # read when submitit is imported: no own handlers
    said = []

    def once(record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if said:
            return False
        said.append(True)
        record.msg, record.args = ("SLURM accounting is off on this cluster (sacct fails; the line above is sacct's "
                                   "own): submitit follows the jobs through their result files instead"), None
        return True

    logging.getLogger("submitit").addFilter(once)


def progress_bar():
    """Lightning's rich bar, described by step (max_epochs is -1: Lightning's "Epoch 0/-2"), without v_num."""
    from lightning.pytorch.callbacks import RichProgressBar

    class StepBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            return "train" if current_epoch == 0 else f"train (epoch {current_epoch + 1})"

        def get_metrics(self, trainer, pl_module):
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return metrics

    return StepBar()
