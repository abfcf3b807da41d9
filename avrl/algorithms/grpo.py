"""GRPO: the loss math (pure functions) and the Lightning module, top to bottom in one file.

Option and metric names follow TRL's GRPOConfig / GRPOTrainer (num_generations, beta, epsilon, epsilon_high,
num_iterations, loss_type, scale_rewards, mask_truncated_completions, temperature, top_p, max_completion_length).
"""

from __future__ import annotations

import contextlib
import time

import torch

from avrl import strategies
from avrl.algorithms.base import AudioLMModule
from avrl.models import load_model
from avrl.policy import prompt_slice
from avrl.rewards import score
from avrl.rollout import Rollout
from avrl.rollout_backends import build_rollout
from avrl.vllm_rollout import importance_weights

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", batch_std: torch.Tensor | None = None
) -> torch.Tensor:
    """Rewards minus their group's mean, divided by the group's std ("group"), the batch's std ("batch") or
    nothing ("none"). Groups are contiguous blocks of `num_generations`; std as torch.std (Bessel). `batch_std`:
    the std of the whole optimizer step's rewards, every rank's (strategies.global_std; TRL gathers the rewards
    before its std); default these rewards' own."""
    grouped = rewards.view(-1, num_generations)
    advantages = rewards - grouped.mean(dim=1).repeat_interleave(num_generations)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1).repeat_interleave(num_generations) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / ((rewards.std() if batch_std is None else batch_std) + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return advantages


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    epsilon: float,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    importance_weights: torch.Tensor | None = None,
    kl_clamp: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO loss over (batch, completion_len) tensors; `advantages` is (batch,).

    ratio = exp(logps - old_logps) clipped to [1 - epsilon, 1 + epsilon_high]; with beta > 0 the k3 estimate
    exp(ref - logps) - (ref - logps) - 1 of KL(policy || ref) is added per token, weighted by beta.
    Reduction over these rows: "grpo" mean per sequence then over sequences; "bnpo"/"dapo" sum over tokens / number
    of tokens; "dr_grpo" sum / (batch * max_completion_length). Across micro-batches and ranks the update weights
    each micro-batch's loss as TRL does (`_micro_batch_weight`). `importance_weights` (per token) rescale the
    surrogate term when the rollout engine's policy differs from the trained one (vLLM; TRL applies them before the
    KL term).
    `kl_clamp` clamps ref - logps to [-kl_clamp, kl_clamp] before the k3 estimate (EchoInk-R1's trainer).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if importance_weights is not None:
        per_token = per_token * importance_weights
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        delta = ref_logps - logps
        if kl_clamp is not None:
            delta = delta.clamp(-kl_clamp, kl_clamp)
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        length = max_completion_length or mask.shape[1]
        loss = (per_token * mask).sum() / (mask.shape[0] * length)

    def masked_mean(x):
        return (x * mask).sum() / mask.sum().clamp(min=1)

    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    metrics = {
        "clip_ratio": masked_mean((low | high).to(logps.dtype)).detach(),
        "clip_ratio/low_mean": masked_mean(low.to(logps.dtype)).detach(),
        "clip_ratio/high_mean": masked_mean(high.to(logps.dtype)).detach(),
    }
    if kl is not None:
        metrics["kl"] = masked_mean(kl).detach()
    return loss, metrics


class GRPOModule(AudioLMModule):
    """One training_step = one rollout (G completions for each prompt of the batch), then `num_iterations`
    optimizer updates on it. Optimization is manual because one rollout feeds several updates.

    `ref_model`: a frozen reference handed in (benchmarks/speed.py's); otherwise configure_model loads one from
    model_cfg when beta != 0 (LoRA needs none)."""

    def __init__(self, *args, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.algo.num_generations < 2:
            raise ValueError(
                f"algorithm.num_generations must be >= 2 (a group needs a spread), got {self.algo.num_generations}"
            )
        self.automatic_optimization = False
        # Held in lists so that they are not registered submodules: the frozen reference never enters checkpoints,
        # and the rollout backend (a vLLM engine with rollout=vllm) is built once the model exists.
        self._ref: list = [ref_model]
        self._rollout: list = [None]
        self._sample_rows: list[dict] = []

    @property
    def ref_model(self):
        return self._ref[0]

    def configure_model(self) -> None:
        super().configure_model()
        if self._rollout[0] is None:
            self._rollout[0] = build_rollout(self.rollout_cfg, self.model_cfg, self.algo, self.processor)
        # A frozen reference only when the KL term is on. LoRA needs none: the reference is the base model with
        # the adapters switched off (see ref_context).
        if self.algo.beta != 0.0 and self.ref_model is None and not self.is_peft:
            self._ref[0] = load_model(self.model_cfg).eval().requires_grad_(False)

    def on_fit_start(self) -> None:
        if self.ref_model is not None and not strategies.shards_parameters(self.trainer.strategy):
            # The reference is not a submodule, so the precision plugin (bf16-true) did not convert it: it follows
            # the policy's dtype here. With fp32 master weights it stays as loaded (model.dtype): only the trained
            # parameters need fp32 copies. (Under ZeRO-3 its own engine holds it, partitioned.)
            dtype = None if strategies.fp32_master_weights(self.trainer) else next(self.model.parameters()).dtype
            self.ref_model.to(device=self.device, dtype=dtype)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    def ref_context(self):
        return self.model.disable_adapter() if self.is_peft else contextlib.nullcontext()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if not batch["items"]:  # every item's media was unreadable (data.on_error=skip): nothing to learn from
            return
        start = time.perf_counter()
        G, algo, policy = self.algo.num_generations, self.algo, self.policy

        # 1. Rollout: the encoders run once per prompt; the G completions share their outputs.
        media = policy.encode(batch)
        rollout = self._rollout[0].generate(policy, batch, media, G, self.rollout_keys(batch["items"], G))
        if algo.mask_truncated_completions:
            rollout.mask = rollout.mask * (~rollout.truncated).unsqueeze(1).long()

        # 2. Score: rewards and group-normalised advantages.
        #    scale_rewards=batch divides by the std of every rank's rewards (TRL gathers them first).
        items = [item for item in batch["items"] for _ in range(G)]
        rewards, per_function = score(self.reward_functions, self.reward_weights, rollout.texts, items, self.prompt)
        rewards = rewards.to(self.device)
        batch_std = strategies.global_std(self.strategy, rewards) if algo.scale_rewards == "batch" else None
        advantages = group_advantages(rewards, G, algo.scale_rewards, batch_std)

        # 3. Update: num_iterations optimizer steps on this rollout.
        stats = self.update(batch, media, rollout, advantages)
        self._rollout[0].sync(self.model)  # the next rollout samples from the updated policy (vLLM)
        self.log_step(rollout, rewards, per_function, advantages, items, stats, time.perf_counter() - start)

    @property
    def strategy(self):
        """The Trainer's strategy (None for a module used outside a Trainer, as the tests do)."""
        return self._trainer.strategy if self._trainer is not None else None

    def update(self, batch: dict, media: dict, rollout: Rollout, advantages: torch.Tensor) -> list:
        """The log-probs the loss compares against (the rollout policy's when it differs from the trained one, and
        the reference's), then `num_iterations` optimizer steps, gradients accumulated over micro-batches of whole
        groups. With a frozen audio encoder the rollout's encoder outputs are reused (they cannot change);
        otherwise each micro-batch re-encodes its prompts once, with gradients."""
        G, algo, policy = self.algo.num_generations, self.algo, self.policy
        ids, mask, temperature = rollout.ids, rollout.mask, algo.temperature
        num_prompts = batch["input_ids"].shape[0]
        reuse_media = not policy.audio_encoder_trains()
        with torch.no_grad():
            need_old = algo.num_iterations > 1 or rollout.sampling_logps is not None
            old_logps = policy.completion_logps(batch, media, ids, mask, G, temperature)[0] if need_old else None
            weights = None
            if rollout.sampling_logps is not None and self.rollout_cfg.importance_sampling_correction:
                weights = importance_weights(
                    old_logps, rollout.sampling_logps, self.rollout_cfg.importance_sampling_cap
                )
            ref_logps = None
            if algo.beta != 0.0:
                with self.ref_context():
                    ref_model = self.ref_model if not self.is_peft else None
                    ref_media = media if (reuse_media and ref_model is None) else policy.encode(batch, ref_model)
                    ref_logps = policy.completion_logps(batch, ref_media, ids, mask, G, temperature, model=ref_model)[0]

        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        chunk = algo.micro_batch_prompts or num_prompts
        num_micro_batches = -(-num_prompts // chunk)
        # dapo's normaliser: the optimizer step's completion tokens over every rank, per rank (the gradients are
        # averaged over ranks), as TRL's num_items_in_batch / num_processes.
        tokens_per_rank = None
        if algo.loss_type == "dapo":
            tokens_per_rank = float(strategies.global_sum(self.strategy, mask.sum())) / strategies.world_size(
                self.strategy
            )
        for _ in range(algo.num_iterations):
            strategies.zero_grad(self.trainer.strategy, optimizer)
            stats = []
            for lo in range(0, num_prompts, chunk):
                strategies.accumulation_boundary(self.trainer.strategy, last=lo + chunk >= num_prompts)
                p, s = slice(lo, lo + chunk), slice(lo * G, (lo + chunk) * G)
                part = prompt_slice(batch, p, with_media=False)
                part_media = (
                    policy.slice_media(media, batch, p) if reuse_media else policy.encode(prompt_slice(batch, p))
                )
                logps, entropy = policy.completion_logps(
                    part, part_media, ids[s], mask[s], G, temperature, with_entropy=True
                )
                old = old_logps[s] if old_logps is not None else logps.detach()
                loss, metrics = grpo_loss(
                    logps,
                    old,
                    ref_logps[s] if ref_logps is not None else None,
                    advantages[s],
                    mask[s],
                    beta=algo.beta,
                    epsilon=algo.epsilon,
                    epsilon_high=algo.epsilon_high,
                    loss_type=algo.loss_type,
                    max_completion_length=algo.max_completion_length,
                    importance_weights=weights[s] if weights is not None else None,
                    kl_clamp=algo.kl_clamp,
                )
                weight = _micro_batch_weight(algo.loss_type, mask, s, num_micro_batches, tokens_per_rank)
                self.manual_backward(loss * weight)
                metrics["loss"] = loss.detach() * weight
                metrics["entropy"] = (entropy * mask[s]).sum() / mask[s].sum().clamp(min=1)
                stats.append((weight, metrics))
            if self.gradients_are_finite(sum(m["loss"] for _, m in stats)):
                self.clip_gradient_norm(optimizer)
                optimizer.step()
                scheduler.step()
        return stats

    def log_step(self, rollout: Rollout, rewards, per_function, advantages, items, stats, seconds: float) -> None:
        """Metrics under TRL's names, and the completions table's rows."""
        G = self.algo.num_generations
        lengths = rollout.mask.sum(1).float()
        grouped = rewards.view(-1, G)
        logs = {
            "train/loss": sum(m["loss"] for _, m in stats),
            "train/reward": rewards.mean(),
            "train/reward_std": grouped.std(dim=1).mean(),
            "train/frac_reward_zero_std": (grouped.std(dim=1) < 1e-6).float().mean(),
            "train/completions/mean_length": lengths.mean(),
            "train/completions/clipped_ratio": rollout.truncated.float().mean(),
            "train/learning_rate": torch.tensor(self.lr_schedulers().get_last_lr()[0]),
            "train/step_time": torch.tensor(seconds),
            "train/skipped_steps": torch.tensor(self.skipped_steps),
        }
        for key in ("clip_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "kl", "entropy"):
            if key in stats[0][1]:
                logs[f"train/{key}"] = sum(w * m[key] for w, m in stats)
        for name, values in per_function.items():
            logs[f"train/rewards/{name}/mean"] = values.mean()
            logs[f"train/rewards/{name}/std"] = values.std()
        self.log_dict({k: v.float().cpu() for k, v in logs.items()}, on_step=True, on_epoch=False)
        self.log("reward", logs["train/reward"].float(), prog_bar=True, logger=False)
        texts = rollout.texts
        self._sample_rows = [
            {
                "prompt": items[i].question,
                "choices": items[i].choices,
                "answer": items[i].answer,
                "completion": texts[i],
                "reward": float(rewards[i]),
                "advantage": float(advantages[i]),
                **{name: float(v[i]) for name, v in per_function.items()},
            }
            for i in range(min(len(texts), self.algo.log_completions_rows))
        ]


def _micro_batch_weight(
    loss_type: str, mask: torch.Tensor, rows: slice, num_micro_batches: int, tokens_per_rank: float | None
) -> float:
    """Weight of one micro-batch's loss (grpo_loss over its rows) in this rank's accumulated gradient, such that
    the gradient summed over micro-batches and averaged over ranks (DDP, DeepSpeed) is TRL's GRPOTrainer's, with
    avrl's micro-batch for TRL's per-device batch and its micro-batches for TRL's accumulation steps:

    - grpo, dr_grpo: the micro-batch's share of this rank's sequences (ranks hold equal batches): the mean over
      every sequence of the step (TRL: each micro-batch's loss / accumulation steps, averaged over ranks);
    - bnpo: 1 / number of micro-batches: each micro-batch normalised by its own token count, then averaged over
      micro-batches and ranks (TRL: loss / current_gradient_accumulation_steps);
    - dapo: the micro-batch's tokens / (the step's tokens over all ranks / world size): the sum over every token of
      the step divided by their global count (TRL: num_items_in_batch / num_processes).
    On one process bnpo is the mean of the micro-batches' token means and dapo the token mean over the batch."""
    if loss_type == "dapo":
        return mask[rows].sum().clamp(min=1).item() / max(float(tokens_per_rank), 1.0)  # in float64
    if loss_type == "bnpo":
        return 1.0 / num_micro_batches
    return mask[rows].shape[0] / mask.shape[0]
