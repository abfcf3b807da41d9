"""What every avrl LightningModule shares: the model (and its Policy view), validation, the update guard, the
optimizer. GRPO (grpo.py) and SFT (sft.py) subclass this and add only their training step.

The policy engine (encode, generate, log-probs) is avrl/policy.py, scoring is avrl/scoring.py, and whatever depends
on the distributed strategy is asked of avrl/strategies.py.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import get_scheduler

from avrl import strategies
from avrl.models import families, load_model
from avrl.models.lora import apply_lora
from avrl.models.processing import AudioTextProcessor
from avrl.policy import Policy, to_device
from avrl.prompts import PromptSpec
from avrl.rewards import RewardFn
from avrl.rollout import sampling_settings
from avrl.sampling import rollout_keys
from avrl.scoring import accuracy_metrics, score_batch

log = logging.getLogger(__name__)


class AudioLMModule(L.LightningModule):
    def __init__(
        self,
        model_cfg: DictConfig,
        algorithm: DictConfig,
        optim: DictConfig,
        processor: AudioTextProcessor,
        prompt: PromptSpec,
        reward_functions: dict[str, RewardFn] | None = None,
        reward_weights: dict[str, float] | None = None,
        model=None,
        rollout: DictConfig | None = None,
        family: families.Family | None = None,
    ):
        super().__init__()
        self.model_cfg, self.algo, self.optim = model_cfg, algorithm, optim
        self.processor, self.prompt = processor, prompt
        # `model` and `family` are handed in by callers that bring their own model (tests, benchmarks/speed.py's
        # text-only Qwen2, which is no entry of avrl's registry); a run's is the registry entry model.family names.
        self.family = family if family is not None else families.get(model_cfg.family)
        self.reward_functions = reward_functions or {}
        self.reward_weights = reward_weights or {}
        self.model = model  # loaded lazily in configure_model unless given (tests pass a model in)
        self.rollout_cfg = rollout if rollout is not None else DictConfig({"backend": "hf"})
        self._val_results: list[dict] = []
        self.skipped_steps, self.nonfinite_in_row = 0, 0
        self.last_validated_step: int | None = None  # the optimizer step of the latest validation
        self.last_val_results: list[dict] = []  # its scored items

    # ----------------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is None:
            self.model = load_model(self.model_cfg)
            if self.algo.lora:
                self.model = apply_lora(self.model, self.algo.lora)
            self.model.train()
        if strategies.fp32_master_weights(self._trainer):
            # Master weights: the trained parameters in float32 (AdamW's update at lr 1e-6 is far below bf16's
            # resolution and would round away), the frozen ones as loaded (model.dtype); under "*-mixed" autocast
            # runs the math in bf16. DeepSpeed keeps its own fp32 master copy, so this is for every other strategy.
            for p in self.model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()

    @property
    def policy(self) -> Policy:
        """The model being trained, with its processor and family (a light view: the model stays this module's)."""
        return Policy(self.model, self.processor, self.family, shared_prefix=self.algo.shared_prefix)

    def rollout_keys(self, items, num_generations: int) -> list[int]:
        """The random stream of each completion at this step: (sampling seed, step, item, completion index)."""
        return rollout_keys(self.algo.sampling_seed, self.global_step, items, num_generations)

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["items"]:  # empty when every item's media was unreadable (data.on_error=skip)
            self._val_results += self.score_greedy(batch)

    def score_greedy(self, batch: dict) -> list[dict]:
        """Greedy completions for a batch, each scored (protocol "strict"): the deterministic evaluation used in
        validation, through the same path as task=eval."""
        return score_batch(
            self.policy,
            batch,
            self.prompt,
            sampling_settings(self.algo),
            format_reward=self.reward_functions.get("format"),
        )

    def on_validation_epoch_end(self) -> None:
        metrics = self.record_validation(self._val_results)
        self._val_results = []
        # self.log (not to the loggers: record_validation did) feeds the callbacks (checkpoint, pruning).
        self.log("val/accuracy", metrics.pop("val/accuracy"), prog_bar=True, sync_dist=True, logger=False)
        self.log_dict(metrics, sync_dist=True, logger=False)

    def on_train_start(self) -> None:
        if self.algo.validate_at_start and self.global_step == 0:  # not again when resuming
            self.validate_now()

    def validate_now(self) -> dict[str, float]:
        """val/* of the model as it is now (step 0 before training, the final model after it), scored through the
        same code as every validation but outside Lightning's loops: every rank scores every item (ZeRO-3 needs all
        ranks in generate), and a strategy is never set up again (DeepSpeed cannot be, after fit)."""
        return self.record_validation(self.score_loader(self.trainer.datamodule.val_dataloader()))

    def record_validation(self, results: list[dict]) -> dict[str, float]:
        """val/* of a validation's scored items, kept as the latest and logged at the number of updates the
        validated model has had (0 = the base), the same step as the console line and the checkpoint's name."""
        self.last_val_results, self.last_validated_step = results, self.global_step
        metrics = accuracy_metrics(results, "val")
        if self.trainer.is_global_zero:
            log.info("step %d: %s", self.global_step, _summary(metrics))
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        return metrics

    def score_loader(self, loader) -> list[dict]:
        """Every item of a loader scored greedily, outside Lightning's loops (each rank scores all of them)."""
        results = []
        for batch in loader:
            if batch["items"]:
                results += self.score_greedy(self.transfer_batch_to_device(batch, self.device, 0))
        return results

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return to_device(batch, device)

    # ------------------------------------------------------------------------------------------ the update
    def gradients_are_finite(self, loss: torch.Tensor | None = None) -> bool:
        """Whether the update may go ahead, decided on every rank alike. If the loss or any gradient is NaN/inf on
        any rank, the gradients are dropped (set to None: the optimizer then leaves every weight and moment as it
        was; DeepSpeed's partitions are cleared by the zero_grad that starts every update), the skip is counted
        in `train/skipped_steps`, and `optim.max_skipped_in_row` skips in a row stop the run."""
        tensors = [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [loss] if loss is not None else []
        if strategies.all_finite(self._trainer.strategy if self._trainer is not None else None, tensors):
            self.nonfinite_in_row = 0
            return True
        for p in self.model.parameters():
            p.grad = None
        self.skipped_steps += 1
        self.nonfinite_in_row += 1
        limit = self.optim.max_skipped_in_row
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
            self.global_step,
            self.nonfinite_in_row,
            self.skipped_steps,
        )
        if self.nonfinite_in_row >= limit:
            raise FloatingPointError(
                f"{self.nonfinite_in_row} updates in a row had a non-finite loss or gradient (at step "
                f"{self.global_step}); stopping. Lower optim.lr, check the data, or raise optim.max_skipped_in_row."
            )
        return False

    def clip_gradient_norm(self, optimizer) -> None:
        strategies.clip_gradient_norm(self, optimizer, self.optim.max_grad_norm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["avrl_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("avrl_skipped_steps", 0)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            betas=tuple(self.optim.betas),
            eps=self.optim.eps,
        )
        total = self.trainer.estimated_stepping_batches * self.algo.num_iterations
        scheduler = get_scheduler(
            self.optim.scheduler,
            optimizer,
            num_warmup_steps=int(self.optim.warmup_ratio * total),
            num_training_steps=total,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('val/')}={v:.3f}" for k, v in sorted(metrics.items()))
