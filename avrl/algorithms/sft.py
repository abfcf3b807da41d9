"""Supervised fine-tuning on the gold answer written in the prompt's format (R1-AQA's SFT baselines).

With `algorithm=lora` the same module trains PEFT LoRA adapters instead of all weights (see avrl/models/lora.py).
"""

from __future__ import annotations

import torch

from avrl.algorithms.base import AudioLMModule
from avrl.prompts import target_answer


class SFTModule(AudioLMModule):
    def targets(self, items, specs=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of each item's target completion (right-padded) and its mask; the stop token is included.
        `specs`: each item's prompt (a prompt mix), else the run's."""
        tok = self.processor.tokenizer
        texts = [self.prompt_target(it, spec) for it, spec in zip(items, specs or [self.prompt] * len(items))]
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [self.processor.stop_token_ids[0]] for t in texts]
        width = max(len(x) for x in ids)
        padded = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            padded[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        return padded.to(self.device), mask.to(self.device)

    def prompt_target(self, item, spec=None) -> str:
        spec = spec or self.prompt
        return spec.sft_target.format(answer=target_answer(spec, item))

    def sft_loss(self, batch: dict) -> torch.Tensor:
        ids, mask = self.targets(batch["items"], batch.get("prompt_specs"))
        policy = self.policy
        # Temperature 1: the likelihood of the targets, whatever algorithm.temperature validation samples with.
        logps, _ = policy.completion_logps(batch, policy.encode(batch), ids, mask, num_generations=1)
        return -(logps * mask).sum() / mask.sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if not batch["items"]:  # every item's media was unreadable (data.on_error=skip): Lightning skips the step
            return None
        loss = self.sft_loss(batch)
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.gradients_are_finite()  # a NaN loss gives NaN gradients: checking the gradients covers both

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # One place for the clipping norm (optim.max_grad_norm), as in GRPO's manual step.
        self.clip_gradient_norm(optimizer)
