"""Exact resume: what a Lightning checkpoint does not hold by itself.

Lightning saves the weights, the optimizer, the scheduler and its loop counters. A run killed mid-epoch and resumed
reaches the same weights as an uninterrupted one only if it also gets back
- the data position: the shuffled order of the epoch and how many batches of it were used (`EpochSampler`), and
- every random generator (Python, NumPy, torch CPU and CUDA: dropout, user code and anything else drawing from
  them; GRPO's completions come from keyed streams, avrl/sampling.py), as they were when the checkpoint was taken.
`ResumeState` is the callback that saves both in the checkpoint and puts them back before the first resumed batch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Sampler

from avrl.atomic import write_atomic
from avrl.checkpoints import previous_of
from avrl.config import hydra_config
from avrl.redaction import redact


def rng_state() -> dict:
    """Every global generator's state, as tensors and plain numbers: checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochSampler(Sampler[int]):
    """A shuffled order per epoch that depends only on (seed, epoch), not on any global generator, split evenly
    over the ranks of a distributed run (rank r takes every world-th index), and able to start an epoch after its
    first batches (`resume_at`, set on resume). It does its own rank split so that a resumed distributed run
    continues exactly too (avrl's Trainer is built with use_distributed_sampler=False)."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches of it already used), set on resume

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[: len(self) * self.world_size][self.rank :: self.world_size]
        # Only the epoch the checkpoint was taken in is cut: a checkpoint at an epoch's last batch resumes at the
        # start of the next epoch, which Lightning begins without it.
        skip = self.resume_at[1] if self.resume_at is not None and self.resume_at[0] == self.epoch else 0
        self.resume_at = None
        yield from mine[skip * self.batch_size :].tolist()

    def __len__(self) -> int:
        return self.size // self.world_size


class ResumeState(Callback):
    """Counts the training batches used in the current epoch and saves them, with the random generators, in every
    checkpoint; on resume it positions the sampler and restores the generators just before the first batch."""

    def __init__(self):
        self.epoch, self.batches_in_epoch = 0, 0
        self._restore: dict | None = None

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch != self.epoch:
            self.epoch, self.batches_in_epoch = trainer.current_epoch, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._restore is not None:
            set_rng_state(self._restore["rng"])
            self._restore = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batches_in_epoch += 1  # before ModelCheckpoint saves (Lightning runs checkpoint callbacks last)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self._restore = state

    def on_train_start(self, trainer, module) -> None:
        """Runs before the epoch's data iterator is created: the sampler skips the batches already used."""
        if self._restore is None:
            return
        sampler = getattr(getattr(trainer.train_dataloader, "batch_sampler", None), "sampler", None)
        if not isinstance(sampler, EpochSampler):
            raise RuntimeError("exact resume needs the train loader's EpochSampler (avrl's AudioQADataModule)")
        sampler.resume_at = (self.epoch, self.batches_in_epoch)


RUN_INFO = "run_info.json"


def save_run_info(out_dir: Path, run_id: str | None, completed: dict[str, float] | None = None) -> None:
    """The MLflow run of this output folder, so that a resumed run logs into the same one, and the job's command
    line overrides; once the run has finished, its result (`completed`), so that running it again returns that
    instead of training again."""
    info = {"mlflow_run_id": run_id, "overrides": job_overrides()}
    if completed is not None:
        info["completed"] = {key: float(value) for key, value in completed.items()}
    write_atomic(out_dir / RUN_INFO, json.dumps(info, indent=2))


def run_info(out_dir: Path) -> dict:
    path = out_dir / RUN_INFO
    return json.loads(path.read_text()) if path.exists() else {}


def resumed_run_id(out_dir: Path) -> str | None:
    return run_info(out_dir).get("mlflow_run_id")


def completed_result(out_dir: Path) -> dict[str, float] | None:
    """The final metrics of a run that finished in this folder, None if none did."""
    return run_info(out_dir).get("completed")


def last_checkpoint(out_dir: Path) -> Path | None:
    """The folder's last checkpoint (a file, or a DeepSpeed folder), or its kept previous one; None if neither."""
    path = out_dir / "checkpoints" / "last.ckpt"
    return path if path.exists() else previous_of(path) if previous_of(path).exists() else None


def job_overrides() -> list[str] | None:
    """The running Hydra job's overrides, secrets masked (None outside a Hydra job: a test composing its
    config)."""
    hydra_cfg = hydra_config()
    return [redact(o) for o in hydra_cfg.overrides.task] if hydra_cfg is not None else None


# Overrides that may change between attempts of one run: where it logs, how it resumes, test-only callbacks.
FREE_TO_CHANGE = ("hydra.", "ckpt_path", "logger.", "callbacks.")


def differing_overrides(recorded: list[str] | None, current: list[str] | None) -> list[str]:
    """The overrides in one list and not the other, but those FREE_TO_CHANGE ([] where either is unknown)."""
    if recorded is None or current is None:
        return []

    def kept(overrides):
        return {o for o in overrides if not o.lstrip("+~").startswith(FREE_TO_CHANGE)}

    return sorted(kept(recorded) ^ kept(current))


def check_same_job(out_dir: Path) -> None:
    """ckpt_path=auto continues (or returns) what the folder holds only for the same command: another one (a
    changed learning rate, say) into a folder that holds a run stops here, naming the difference."""
    recorded, current = run_info(out_dir).get("overrides"), job_overrides()
    differ = differing_overrides(recorded, current)
    if differ:
        raise ValueError(
            f"{out_dir} holds a run of another command (overrides that differ: {' '.join(differ)}): "
            "ckpt_path=auto would continue it. Use another hydra.run.dir, or ckpt_path=last to resume "
            "it with the new overrides on purpose, or ckpt_path=null to start afresh there"
        )


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """`ckpt_path=auto`: the output folder's last checkpoint if it has one, else None (a fresh start).
    `ckpt_path=last` is <output_dir>/checkpoints/last.ckpt and must exist; any other value is a path. Under
    DeepSpeed a checkpoint is a folder (the engine's partitioned weights and optimizer states, Lightning's state
    beside them)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        found = last_checkpoint(out_dir)
        if found:
            check_same_job(out_dir)
        return str(found) if found else None
    path = out_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.exists():
        hint = (
            " (resume a run by giving its output folder: hydra.run.dir=<that folder> ckpt_path=last)"
            if ckpt_path == "last"
            else ""
        )
        raise FileNotFoundError(f"no checkpoint at {path}{hint}")
    return str(path)


def log_each_step_once(logger) -> int:
    """A resumed run replays the steps between its checkpoint and the kill, which its MLflow run logged already.
    Resume is exact, so the values are the same: drop every metric at or before the last step the run holds for
    it, so that each step of each metric is logged once. Returns the number of metrics already in the run."""
    client, run_id = logger.experiment, logger.run_id
    logged = {
        key: max(m.step for m in client.get_metric_history(run_id, key)) for key in client.get_run(run_id).data.metrics
    }
    log_metrics = logger.log_metrics

    def log_new(metrics, step=None):
        new = {k: v for k, v in metrics.items() if step is None or step > logged.get(k, -1)}
        if new:
            log_metrics(new, step)

    logger.log_metrics = log_new
    return len(logged)
