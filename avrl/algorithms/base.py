"""What every avrl LightningModule shares: the model, encoder-once generation and log-probs, validation, optimizer.

GRPO (grpo.py) and SFT (sft.py) subclass this and add only their training step.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from omegaconf import DictConfig
from transformers import LogitsProcessorList

from avrl.models import load_model
from avrl.models import multimodal as mm
from avrl.models.processing import AudioTextProcessor
from avrl.prompts import PromptSpec, predicted_text
from avrl.rewards import RewardFn, is_correct
from avrl.sampling import KeyedSampler, row_key

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
    ):
        super().__init__()
        self.model_cfg, self.algo, self.optim = model_cfg, algorithm, optim
        self.processor, self.prompt = processor, prompt
        self.family = model_cfg.family
        self.reward_functions = reward_functions or {}
        self.reward_weights = reward_weights or {}
        self.model = model  # loaded lazily in configure_model unless given (tests pass a model in)
        self.rollout_cfg = rollout if rollout is not None else DictConfig({"backend": "hf"})
        self._val_results: list[dict] = []
        self.skipped_steps, self.nonfinite_in_row = 0, 0

    # ----------------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is None:
            self.model = load_model(self.model_cfg)
            if self.algo.get("lora"):
                from avrl.models.lora import apply_lora

                self.model = apply_lora(self.model, self.algo.lora)
            self.model.train()
        if self.fp32_master_weights:
            # Master weights: the trained parameters in float32 (AdamW's update at lr 1e-6 is far below bf16's
            # resolution and would round away), the frozen ones as loaded (model.dtype); under "*-mixed" autocast
            # runs the math in bf16. DeepSpeed keeps its own fp32 master copy, so this is for every other strategy.
            for p in self.model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()

    @property
    def fp32_master_weights(self) -> bool:
        """Training outside DeepSpeed under a precision meant to keep float32 weights ("32-true", "*-mixed"),
        whatever model.dtype the weights were loaded in."""
        trainer = self._trainer
        return (trainer is not None and str(trainer.precision) in ("32-true", "bf16-mixed", "16-mixed")
                and not isinstance(trainer.strategy, DeepSpeedStrategy))

    def encode(self, batch: dict, model=None) -> dict[str, torch.Tensor]:
        """Audio/image encoder outputs for each prompt of the batch: the encoders run once per prompt."""
        return mm.encode_media(model or self.model, self.family, batch)

    @torch.no_grad()
    def generate(self, batch: dict, media: dict, num_generations: int, sample: bool, draw: int = 0,
                 settings: dict | None = None):
        """`num_generations` completions per prompt, grouped contiguously. Returns (ids, mask); the mask covers
        each completion up to and including its first stop token. Sampling is keyed (avrl/sampling.py): completion
        g of an item at this step is the same whatever the batching; `draw` tells repeated draws apart.
        `settings` (max_new_tokens, temperature, top_p, top_k) replace the algorithm's: task=eval's own."""
        opts = {"max_new_tokens": self.algo.max_completion_length, "temperature": self.algo.temperature,
                "top_p": self.algo.top_p, "top_k": self.algo.get("top_k", 0), **(settings or {})}
        model = mm.unwrap(self.model)
        was_training = model.training
        model.eval()
        prompt_embeds = mm.embed(model, batch["input_ids"], media).repeat_interleave(num_generations, dim=0)
        rep = mm.repeat_prompts(batch, num_generations)
        processors = []
        if sample:
            keys = self.rollout_keys(batch["items"], num_generations, draw)
            processors.append(KeyedSampler(keys, rep["input_ids"].shape[1], opts["temperature"], opts["top_p"],
                                           opts["top_k"]))
        out = model.generate(
            input_ids=rep["input_ids"],
            inputs_embeds=prompt_embeds,
            attention_mask=rep["attention_mask"],
            max_new_tokens=opts["max_new_tokens"],
            eos_token_id=self.processor.stop_token_ids,
            pad_token_id=self.processor.tokenizer.pad_token_id,
            use_cache=True,
            do_sample=False,  # greedy, or greedy over the keyed sampler's one-hot scores
            logits_processor=LogitsProcessorList(processors),
            **mm.rope_inputs(self.family, rep),
        )
        model.train(was_training)
        ids = out[:, rep["input_ids"].shape[1] :]
        return ids, completion_mask(ids, self.processor.stop_token_ids)

    def rollout_keys(self, items, num_generations: int, draw: int = 0) -> list[int]:
        """The random stream of each completion: (sampling seed, step, item, completion index)."""
        seed = self.algo.get("sampling_seed", 0)
        return [row_key(seed, self.global_step, item.id, draw * num_generations + g)
                for item in items for g in range(num_generations)]

    def completion_logps(self, batch, media, ids, mask, num_generations, model=None, with_entropy=False):
        """Per-token log-probs of the completions (B*G, T) under `model` (the policy by default), logits divided by
        the sampling temperature as in TRL. The prompt embeddings are built once per prompt and repeated."""
        model = model or self.model
        prompt_embeds = mm.embed(model, batch["input_ids"], media).repeat_interleave(num_generations, dim=0)
        rep = mm.repeat_prompts(batch, num_generations)
        embeds = torch.cat([prompt_embeds, mm.unwrap(model).get_input_embeddings()(ids)], dim=1)
        input_ids = torch.cat([rep["input_ids"], ids], dim=1)
        attention = torch.cat([rep["attention_mask"], mask.to(rep["attention_mask"].dtype)], dim=1)
        logits = mm.forward_logits(model, self.family, input_ids, attention, embeds, rep, keep=ids.shape[1] + 1)
        logits = logits[:, :-1].float() / self.algo.get("temperature", 1.0)
        logps = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        if not with_entropy:
            return logps, None
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
        return logps, entropy

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return self.processor.decode(ids.masked_fill(mask == 0, self.processor.tokenizer.pad_token_id))

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["items"]:  # empty when every item's media was unreadable (data.on_error=skip)
            self._val_results += self.score_greedy(batch)

    def score_greedy(self, batch: dict) -> list[dict]:
        """Greedy completions for a batch, each scored: the deterministic evaluation used in validation."""
        ids, mask = self.generate(batch, self.encode(batch), 1, sample=False)
        results = []
        for item, text in zip(batch["items"], self.decode(ids, mask)):
            results.append({
                "id": item.id, "category": item.category, "difficulty": item.difficulty,
                "correct": float(is_correct(text, item, self.prompt)),
                "format": self.reward_functions["format"]([text], [item], self.prompt)[0]
                if "format" in self.reward_functions else float("nan"),
                "completion": text, "prediction": predicted_text(self.prompt, text, item.choices),
            })
        return results

    def on_validation_epoch_end(self) -> None:
        metrics = accuracy_metrics(self._val_results, "val")
        self._val_results = []
        log.info("step %d: %s", self.global_step, _summary(metrics))
        self.log("val/accuracy", metrics.pop("val/accuracy"), prog_bar=True, sync_dist=True)
        self.log_dict(metrics, sync_dist=True)

    def on_train_start(self) -> None:
        if self.algo.validate_at_start and self.global_step == 0:  # not again when resuming
            self.validate_before_training()

    def validate_before_training(self) -> None:
        """val/accuracy at step 0, through the same code as every later validation."""
        loader = self.trainer.datamodule.val_dataloader()
        results = []
        for batch in loader:
            if batch["items"]:
                results += self.score_greedy(self.transfer_batch_to_device(batch, self.device, 0))
        metrics = accuracy_metrics(results, "val")
        log.info("step 0: %s", _summary(metrics))
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------------------------------ optimizer
    def gradients_are_finite(self, loss: torch.Tensor | None = None) -> bool:
        """Whether the update may go ahead, decided on every rank alike. If the loss or any gradient is NaN/inf on
        any rank, the gradients are dropped (set to None: the optimizer then leaves every weight and moment as it
        was; DeepSpeed's partitions are cleared by the zero_grad that starts every update), the skip is counted
        in `train/skipped_steps`, and `optim.max_skipped_in_row` skips in a row stop the run."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        checks = [g.isfinite().all() for g in grads] + ([loss.isfinite().all()] if loss is not None else [])
        finite = not checks or bool(torch.stack(checks).all())
        if self._trainer is not None:  # sharded gradients (ZeRO, FSDP) differ between ranks
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.nonfinite_in_row = 0
            return True
        for p in self.model.parameters():
            p.grad = None
        self.skipped_steps += 1
        self.nonfinite_in_row += 1
        limit = self.optim.get("max_skipped_in_row", 10)
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
                    self.global_step, self.nonfinite_in_row, self.skipped_steps)
        if self.nonfinite_in_row >= limit:
            raise FloatingPointError(
                f"{self.nonfinite_in_row} updates in a row had a non-finite loss or gradient (at step "
                f"{self.global_step}); stopping. Lower optim.lr, check the data, or raise optim.max_skipped_in_row.")
        return False

    def clip_gradient_norm(self, optimizer) -> None:
        """Clip to `optim.max_grad_norm` in the way the strategy allows."""
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            return  # the engine clips inside its step: gradient_clipping is set from optim.max_grad_norm
        if isinstance(strategy, FSDPStrategy):
            # Lightning refuses norm clipping under FSDP: sharded gradients need the root module's clip_grad_norm_.
            strategy.model.clip_grad_norm_(self.optim.max_grad_norm)
            return
        self.clip_gradients(optimizer, gradient_clip_val=self.optim.max_grad_norm, gradient_clip_algorithm="norm")

    def accumulation_boundary(self, last: bool) -> None:
        """Start a micro-batch: say whether its backward pass is the last before the optimizer step. DeepSpeed's
        engine, configured with gradient_accumulation_steps=1 (one optimizer step per Lightning step), otherwise
        takes every backward for a boundary, and ZeRO-2 then replaces the previous micro-batch's gradients."""
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            engine = self.trainer.strategy.deepspeed_engine
            # What engine.forward does first. All micro-batches run inside one Lightning forward, so each starts its
            # micro-step here; otherwise ZeRO-3 copies a micro-batch's gradients over the previous one's.
            if hasattr(engine.optimizer, "clear_backward_seen_flag"):
                engine.optimizer.clear_backward_seen_flag()
            engine.set_gradient_accumulation_boundary(last)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["avrl_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("avrl_skipped_steps", 0)

    def configure_optimizers(self):
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.optim.lr, weight_decay=self.optim.weight_decay, betas=tuple(self.optim.betas),
            eps=self.optim.get("eps", 1e-8),
        )
        total = self.trainer.estimated_stepping_batches * self.algo.get("num_iterations", 1)
        scheduler = get_scheduler(
            self.optim.scheduler, optimizer, num_warmup_steps=int(self.optim.warmup_ratio * total),
            num_training_steps=total,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def completion_mask(ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 for each token up to and including the first stop token, 0 after it."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    seen_before = (is_stop.cumsum(dim=1) - is_stop.long()) > 0
    return (~seen_before).long()


def accuracy_metrics(results: list[dict], prefix: str) -> dict[str, float]:
    """`<prefix>/accuracy` overall and per category and difficulty, plus the format rate."""
    if not results:
        return {f"{prefix}/accuracy": float("nan")}
    metrics = {f"{prefix}/accuracy": sum(r["correct"] for r in results) / len(results)}
    formats = [r["format"] for r in results if r["format"] == r["format"]]
    if formats:
        metrics[f"{prefix}/format"] = sum(formats) / len(formats)
    for key in ("category", "difficulty"):
        groups = defaultdict(list)
        for r in results:
            if r.get(key):
                groups[r[key]].append(r["correct"])
        for name, values in groups.items():
            metrics[f"{prefix}/accuracy/{name}"] = sum(values) / len(values)
    return metrics


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('val/')}={v:.3f}" for k, v in sorted(metrics.items()))
