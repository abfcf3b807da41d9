"""The policy: a model with its processor and family, and the five things every algorithm, the evaluation and the
benchmark do with it — encode the media, generate, score completions (log-probs), decode, slice a batch.

A Policy is a light view: the Lightning modules keep the model as their registered submodule (checkpoints,
strategies) and hand out `Policy(self.model, ...)` when they need one; task=eval builds one without a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from avrl.models import multimodal as mm
from avrl.models import shared_prefix
from avrl.models.families import Family
from avrl.sampling import KeyedSampler, padding_lengths

MEDIA_KEYS = ("input_features", "pixel_values")


@dataclass
class Policy:
    model: torch.nn.Module
    processor: object  # AudioTextProcessor (or the benchmark's text-only stand-in)
    family: Family
    # Each prompt through the language model once per group (avrl/models/shared_prefix.py) instead of G times:
    # the training modules pass algorithm.shared_prefix (avrl/schemas.py holds its default); no default here.
    shared_prefix: bool

    # ------------------------------------------------------------------------------------------- encode
    def encode(self, batch: dict, model=None) -> dict[str, torch.Tensor]:
        """Audio/image encoder outputs for each prompt of the batch: the encoders run once per prompt."""
        return mm.encode_media(model or self.model, self.family, batch)

    # ----------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self, batch: dict, media: dict, num_generations: int, settings: dict, keys: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`num_generations` completions per prompt, grouped contiguously; greedy when `keys` is None, else each
        row sampled from its own keyed stream (avrl/sampling.py) under `settings` (max_new_tokens, temperature,
        top_p, top_k; repetition_penalty and min_p, off when absent). Greedy decoding applies the repetition
        penalty too (transformers' own processor). Returns (ids, mask); the mask covers each completion up to and
        including its first stop."""
        model = mm.unwrap(self.model)
        was_training = model.training
        model.eval()
        penalty = float(settings.get("repetition_penalty", 1.0))
        rows_mask = batch["attention_mask"].repeat_interleave(num_generations, dim=0)
        processor = None
        if keys is not None:
            processor = KeyedSampler(
                keys,
                batch["input_ids"].shape[1],
                settings["temperature"],
                settings["top_p"],
                settings.get("top_k", 0),
                penalty,
                float(settings.get("min_p", 0.0)),
                prompt_padding=padding_lengths(rows_mask),
            )
        elif penalty != 1.0:
            processor = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding_lengths(rows_mask))
        if self.shared_prefix:
            ids = shared_prefix.generate(
                model,
                self.family,
                batch,
                mm.embed(model, batch["input_ids"], media),
                num_generations,
                settings["max_new_tokens"],
                self.processor.stop_token_ids,
                self.processor.tokenizer.pad_token_id,
                choose=_chooser(processor, batch["input_ids"].repeat_interleave(num_generations, dim=0)),
            )
            model.train(was_training)
            return ids, completion_mask(ids, self.processor.stop_token_ids)
        prompt_embeds = mm.embed(model, batch["input_ids"], media).repeat_interleave(num_generations, dim=0)
        rep = mm.repeat_prompts(batch, num_generations)
        out = model.generate(
            input_ids=rep["input_ids"],
            inputs_embeds=prompt_embeds,
            attention_mask=rep["attention_mask"],
            max_new_tokens=settings["max_new_tokens"],
            eos_token_id=self.processor.stop_token_ids,
            pad_token_id=self.processor.tokenizer.pad_token_id,
            use_cache=True,
            do_sample=False,  # greedy, or greedy over the keyed sampler's one-hot scores
            logits_processor=LogitsProcessorList([processor] if processor is not None else []),
            **self.family.rope_inputs(rep),
        )
        model.train(was_training)
        ids = out[:, rep["input_ids"].shape[1] :]
        return ids, completion_mask(ids, self.processor.stop_token_ids)

    # ---------------------------------------------------------------------------------------- log-probs
    def completion_logps(
        self, batch, media, ids, mask, num_generations, temperature: float = 1.0, model=None, with_entropy: bool = False
    ):
        """Per-token log-probs of the completions (B*G, T) under `model` (the policy's by default), logits divided
        by the sampling temperature as in TRL. With `shared_prefix` each prompt runs once with its G completions
        packed after it; otherwise its embeddings (built once) are repeated G times."""
        model = model or self.model
        if self.shared_prefix:
            prompt_embeds = mm.embed(model, batch["input_ids"], media)
            logits = shared_prefix.completion_logits(model, self.family, batch, prompt_embeds, ids, num_generations)
            return _logps(logits, ids, temperature, with_entropy)
        prompt_embeds = mm.embed(model, batch["input_ids"], media).repeat_interleave(num_generations, dim=0)
        rep = mm.repeat_prompts(batch, num_generations)
        embeds = torch.cat([prompt_embeds, mm.unwrap(model).get_input_embeddings()(ids)], dim=1)
        input_ids = torch.cat([rep["input_ids"], ids], dim=1)
        attention = torch.cat([rep["attention_mask"], mask.to(rep["attention_mask"].dtype)], dim=1)
        logits = mm.forward_logits(model, self.family, input_ids, attention, embeds, rep, keep=ids.shape[1] + 1)
        return _logps(logits[:, :-1], ids, temperature, with_entropy)

    # ------------------------------------------------------------------------------------------- decode
    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return self.processor.decode(ids.masked_fill(mask == 0, self.processor.tokenizer.pad_token_id))

    def stopped(self, ids: torch.Tensor) -> torch.Tensor:
        """Whether each completion emitted a stop token (False: it was cut at max_new_tokens)."""
        return torch.isin(ids, torch.tensor(self.processor.stop_token_ids, device=ids.device)).any(dim=1)

    # ------------------------------------------------------------------------------------------ slicing
    def slice_media(self, media: dict, batch: dict, prompts: slice) -> dict:
        """The encoder outputs of a slice of prompts (features are flat, in prompt order)."""
        out = {}
        if "audio" in media:
            counts = self.family.audio_token_count(batch["feature_attention_mask"].sum(-1)).tolist()
            start = sum(counts[: prompts.start])
            out["audio"] = media["audio"][start : start + sum(counts[prompts])]
        if "image" in media:
            merge = mm.unwrap(self.model).config.vision_config.spatial_merge_size ** 2
            counts = (batch["image_grid_thw"].prod(-1) // merge).tolist()
            start = sum(counts[: prompts.start])
            out["image"] = media["image"][start : start + sum(counts[prompts])]
        return out

    def audio_encoder_trains(self) -> bool:
        encoder = mm.audio_encoder(self.model)
        return encoder is not None and any(p.requires_grad for p in encoder.parameters())


def to_device(batch: dict, device) -> dict:
    """A collated batch with its tensors on `device` (items and other values as they are)."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def prompt_slice(batch: dict, prompts: slice, with_media: bool = True) -> dict:
    """A batch restricted to some prompts; with `with_media` the media inputs too (one audio and at most one image
    per prompt), otherwise without them (their encoder outputs come from `Policy.slice_media`)."""
    if "audio_clips" in batch:  # MMAU-Pro's items: the per-clip masks and features would need slicing by clip
        raise NotImplementedError(
            "training on items with several audio clips is not supported (the update's micro-batches assume one "
            "clip per prompt); such data (data=mmau_pro) is for task=eval or final_eval.benchmarks"
        )
    out = {}
    for key, value in batch.items():
        if key in MEDIA_KEYS and not with_media:
            continue
        out[key] = value[prompts] if torch.is_tensor(value) and key != "pixel_values" else value
    if with_media and "pixel_values" in batch:
        patches = batch["image_grid_thw"].prod(-1).tolist()
        start = sum(patches[: prompts.start])
        out["pixel_values"] = batch["pixel_values"][start : start + sum(patches[prompts])]
    return out


def _logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float, with_entropy: bool):
    """Log-probs of `ids` under logits / temperature, and (without gradient) the entropy of each position."""
    logits = logits.float() / temperature
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    return logps, entropy


def _chooser(processor, prompt_ids: torch.Tensor):
    """`choose(scores, position) -> tokens` for the shared-prefix decoding loop: the logits processor (keyed
    sampler or repetition penalty; None: plain argmax) sees the rows' sequences so far, prompt included, as in
    transformers' generate. A finished row's later tokens differ (generate appends pad) but are never used."""
    if processor is None:
        return None
    sequences = prompt_ids

    def choose(scores: torch.Tensor, position: int) -> torch.Tensor:
        nonlocal sequences
        tokens = processor(sequences, scores).argmax(dim=-1)
        sequences = torch.cat([sequences, tokens[:, None].to(sequences.device)], dim=1)
        return tokens

    return choose


def completion_mask(ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 for each token up to and including the first stop token, 0 after it."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    seen_before = (is_stop.cumsum(dim=1) - is_stop.long()) > 0
    return (~seen_before).long()
