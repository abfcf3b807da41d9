"""Checkpoint sweeps, the training side: keep the model's weights every N steps, all kept, for task=eval to score.

R1-AQA's 64.5% on MMAU test-mini is the best of its checkpoints (saved every 100 steps, all kept, each scored on
test-mini, then ranked: xiaomi-research/r1-aqa src/test_mmau.sh, src/utils/show_acc.py). With
`keep_checkpoints_every_n_steps=N` a run keeps the weights (a LoRA run: its adapters) with the processor, as a
transformers folder `<output_dir>/checkpoints/steps/step-<000100>/`, every N optimizer steps; `index.json` beside
them records each kept step, every validation's val/accuracy and the final step. `task=eval ckpt_path=<the run's
output_dir>` scores them (avrl/checkpoint_sweep_eval.py; docs/checkpoint_sweeps.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from peft import PeftModel
from transformers import GenerationConfig

from avrl import strategies
from avrl.atomic import sync_folder, write_atomic
from avrl.models.loading import DTYPES

log = logging.getLogger(__name__)

STEPS = Path("checkpoints") / "steps"  # under a training run's output_dir
INDEX = "index.json"


def folder_name(step: int) -> str:
    return f"step-{step:06d}"


def read_index(steps: Path) -> dict:
    """A run's index.json: {"kept": {step: folder}, "val_accuracy": {step: value}, "final_step", "every_n_steps"}."""
    path = steps / INDEX
    if not path.exists():
        return {"kept": {}, "val_accuracy": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:  # written atomically: only a hand edit gets here
        raise ValueError(f"{path}: not valid JSON ({error}); fix or delete it") from error


class KeepCheckpoints(Callback):
    """Every `every_n_steps` optimizer steps, the model's weights (LoRA: the adapters) and the processor as a
    transformers folder in `<out>/checkpoints/steps/step-<step>/`, never overwritten nor deleted. A batch can
    advance several optimizer steps (algorithm.num_iterations > 1): a folder is kept at the first step at or
    past each multiple of N, named by that step."""

    def __init__(self, every_n_steps: int, out: Path, model_cfg: DictConfig):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"keep_checkpoints_every_n_steps: a positive integer or null, got {every_n_steps!r}")
        self.every, self.steps, self.model_cfg = every_n_steps, out / STEPS, model_cfg
        self.index: dict = {"kept": {}, "val_accuracy": {}}
        self.last_step = 0

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.is_global_zero:
            self.steps.mkdir(parents=True, exist_ok=True)
            self.index = read_index(self.steps)  # a resumed run adds to what its first attempt kept
            for partial in self.steps.glob(".step-*.partial-*"):  # a write a kill cut short: never a kept folder
                shutil.rmtree(partial, ignore_errors=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_step = trainer.global_step
        every_val = trainer.val_check_interval
        if trainer.is_global_zero and isinstance(every_val, int) and self.every % every_val:
            # Lightning counts val_check_interval in batches, avrl's steps in optimizer steps: with 1 update per
            # batch (GRPO's num_iterations 1, SFT without accumulation) the two agree.
            log.warning(
                "keep_checkpoints_every_n_steps=%d is no multiple of trainer.val_check_interval=%d: checkpoints "
                "kept between validations have no val/accuracy, and task=eval's best-on-validation choice ignores them",
                self.every,
                every_val,
            )
        if trainer.is_global_zero and trainer.ckpt_path is None and self.index["kept"]:
            log.warning(
                "%s already holds kept checkpoints (steps %s) and this run starts fresh: those steps are not "
                "written again (a fresh run belongs in another hydra.run.dir)",
                self.steps,
                ", ".join(sorted(self.index["kept"], key=int)),
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step // self.every > self.last_step // self.every:
            self.keep(trainer, pl_module, step)
        self.last_step = step

    def on_validation_end(self, trainer, pl_module) -> None:
        accuracy = trainer.callback_metrics.get("val/accuracy")  # averaged over ranks (sync_dist)
        if not trainer.sanity_checking and accuracy is not None:
            self.record(trainer, val={trainer.global_step: float(accuracy)})

    def record_final(self, trainer, step: int, val_accuracy: float | None) -> None:
        """The final model's step and val/accuracy (its validation may run after fit, where no callback sees it)."""
        self.record(trainer, val={step: val_accuracy} if val_accuracy is not None else {}, final_step=step)

    def record(self, trainer, val: dict[int, float] | None = None, final_step: int | None = None) -> None:
        if not trainer.is_global_zero:
            return
        self.index["every_n_steps"] = self.every
        self.index["val_accuracy"].update({str(k): v for k, v in (val or {}).items()})
        if final_step is not None:
            self.index["final_step"] = final_step
        write_atomic(self.steps / INDEX, json.dumps(self.index, indent=2, sort_keys=True) + "\n")

    def keep(self, trainer, pl_module, step: int) -> None:
        target = self.steps / folder_name(step)
        # Every rank must take the same branch (ZeRO-3 gathers with all of them): rank 0's view of the disk decides.
        exists = trainer.strategy.broadcast(target.exists() if trainer.is_global_zero else False, src=0)
        if exists:  # a resumed run passing a step its first attempt kept: the same weights, left as they are
            log.info("step %d: %s is already kept, left as it is", step, target)
            return
        with strategies.full_weights(trainer.strategy, pl_module.model):
            if trainer.is_global_zero:
                write_folder(pl_module.model, pl_module.processor, target, DTYPES[self.model_cfg.dtype], self.model_cfg)
        if trainer.is_global_zero:
            self.index["kept"][str(step)] = target.name
            self.record(trainer)
            log.info("step %d: weights kept in %s", step, target)


def write_folder(model, processor, target: Path, dtype: torch.dtype, model_cfg: DictConfig) -> None:
    """The model (a PEFT model: its adapters) and processor as a transformers folder at `target`, whole or absent:
    written beside it, each file flushed, then renamed (avrl/atomic.py's rule for files, applied to a folder)."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write(model, processor, partial, dtype, model_cfg)
    except BaseException:  # a full disk, a kill signal: no half folder left taking the space (a 7B's is ~17 GB)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, target)
    sync_folder(target.parent)


def _write(model, processor, partial: Path, dtype: torch.dtype, model_cfg: DictConfig) -> None:
    if isinstance(model, PeftModel):
        model.save_pretrained(partial)  # the adapters only: a few MB
    else:
        # In the model's dtype (bf16 for the 7B options), not the fp32 master copy the optimizer updates: half the
        # disk, and what task=eval loads anyway (load_model casts to model.dtype).
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.save_pretrained(partial, state_dict=state)
        base_generation_config(model_cfg, partial)
    processor.save_pretrained(partial)
    for path in partial.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def base_generation_config(model_cfg: DictConfig, folder: Path) -> None:
    """The base checkpoint's generation_config.json in `folder`, as in R1-AQA's checkpoints (the HF Trainer copies
    it): avrl's loaded model holds only its special tokens (avrl/models/loading.py), which save_pretrained would
    write; eval.decoding=checkpoint reads the sampling settings from this file."""
    try:
        config = GenerationConfig.from_pretrained(str(model_cfg.name_or_path), revision=model_cfg.revision)
    except OSError:  # the base has none: the written one stays
        return
    config.save_pretrained(folder)
