"""Forward passes with the audio (and image) encoders run once per prompt.

The published GRPO trainers repeat each prompt's audio features G times and run the encoder on every copy.
Here `encode_media` runs the encoders once per prompt, `embed` writes their outputs into the prompt's placeholder
positions, and those embeddings are repeated G times (a cheap copy) for generation and for the loss. What differs
between model families (the audio encoder's call, rope inputs) is asked of the family (avrl/models/families).
"""

from __future__ import annotations

import torch

from avrl.models.families import Family

# Keys of a prompt batch that hold per-prompt tensors (repeated G times with the prompt) and media inputs.
PER_PROMPT_KEYS = ("input_ids", "attention_mask", "feature_attention_mask", "image_grid_thw")


def unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place, so they stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def audio_encoder(model):
    return getattr(unwrap(model).model, "audio_tower", None)  # None for a text-only LM (the TRL benchmark)


def vision_encoder(model):
    return getattr(unwrap(model).model, "visual", None)


def encode_media(model, family: Family, batch: dict) -> dict[str, torch.Tensor]:
    """Encoder outputs, flattened in placeholder order: {"audio": (n_audio_tokens, d), "image": (...)}."""
    model = unwrap(model)
    media = {}
    if "input_features" in batch:
        media["audio"] = family.encode_audio(model, batch["input_features"], batch["feature_attention_mask"])
    if "pixel_values" in batch:
        image = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        media["image"] = torch.cat(image.pooler_output, dim=0)
    return media


def embed(model, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token embeddings with the encoder outputs written over the placeholder tokens."""
    model = unwrap(model)
    embeds = model.get_input_embeddings()(input_ids)
    config = model.config
    for kind, token_id in (
        ("audio", getattr(config, "audio_token_id", None)),
        ("image", getattr(config, "image_token_id", None)),
    ):
        if kind not in media:
            continue
        mask = input_ids == token_id
        features = media[kind]
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(mask.sum())} {kind} placeholder tokens but {features.shape[0]} {kind} features")
        if kind == "audio" and hasattr(model.model, "multi_modal_projector"):  # Qwen2-Audio's projector
            features = model.model.multi_modal_projector(features)
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
    return embeds


def forward_logits(model, family: Family, input_ids, attention_mask, inputs_embeds, extra: dict, keep: int = 0):
    """Logits for already-merged embeddings; only the last `keep` positions when keep > 0 (the completion), which
    spares a (batch, prompt length, vocabulary) tensor. `extra` holds the media sizes a 3-D rope needs."""
    model = unwrap(model)
    hidden = model.model(
        input_ids=input_ids if family.forward_takes_input_ids else None,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        position_ids=family.position_ids(attention_mask),
        use_cache=False,
        **family.rope_inputs(extra),
    ).last_hidden_state
    return model.lm_head(hidden[:, -keep:] if keep else hidden)


def repeat_prompts(batch: dict, repeats: int) -> dict:
    """Each per-prompt tensor repeated `repeats` times, grouped contiguously (prompt 0 x G, prompt 1 x G, ...).
    Audio masks are per clip: a batch whose prompts hold other than one clip each says how many (`audio_clips`),
    and each prompt's clips are repeated together, in order (the 3-D rope reads them in placeholder order)."""
    out = {k: v.repeat_interleave(repeats, dim=0) for k, v in batch.items() if k in PER_PROMPT_KEYS}
    if "audio_clips" in batch and "feature_attention_mask" in batch:
        out["feature_attention_mask"] = batch["feature_attention_mask"][clip_rows(batch["audio_clips"], repeats)]
        out["audio_clips"] = batch["audio_clips"].repeat_interleave(repeats)
    return out


def clip_rows(clips: torch.Tensor, repeats: int) -> torch.Tensor:
    """Row indices of the per-clip tensors with each prompt's clips (`clips[p]` of them) repeated `repeats` times."""
    starts = (clips.cumsum(0) - clips).tolist()
    rows = [start + c for start, n in zip(starts, clips.tolist()) for _ in range(repeats) for c in range(n)]
    return torch.tensor(rows, dtype=torch.long, device=clips.device)
