"""Forward passes with the audio (and image) encoders run once per prompt.

The published GRPO trainers repeat each prompt's audio features G times and run the encoder on every copy.
Here `encode_media` runs the encoders once per prompt, `prompt_embeddings` writes their outputs into the prompt's
placeholder positions, and those embeddings are repeated G times (a cheap copy) for generation and for the loss.
"""

from __future__ import annotations

import torch

# Keys of a prompt batch that hold per-prompt tensors (repeated G times with the prompt) and media inputs.
PER_PROMPT_KEYS = ("input_ids", "attention_mask", "feature_attention_mask", "image_grid_thw")


def unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place, so they stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_media(model, family: str, batch: dict) -> dict[str, torch.Tensor]:
    """Encoder outputs, flattened in placeholder order: {"audio": (n_audio_tokens, d), "image": (...)}."""
    model = unwrap(model)
    media = {}
    if "input_features" in batch:
        media["audio"] = _audio_features(model, family, batch["input_features"], batch["feature_attention_mask"])
    if "pixel_values" in batch:
        image = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        media["image"] = torch.cat(image.pooler_output, dim=0)
    return media


def _audio_features(model, family: str, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    if family == "qwen2_5_omni":
        return model.model.get_audio_features(features, feature_mask, return_dict=True).last_hidden_state
    # Qwen2-Audio, as Qwen2AudioModel.forward does it: encode the padded window, keep each clip's valid outputs.
    # The projector into the LM is applied in `embed`, so that a frozen encoder's outputs can be reused while the
    # projector trains.
    from transformers.masking_utils import create_bidirectional_mask

    tower = model.model.audio_tower
    after_conv, out_lengths = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
    steps = (features.shape[-1] - 2) // 2 + 1
    valid = torch.arange(steps, device=features.device)[None, :] < after_conv[:, None]
    attention = create_bidirectional_mask(
        config=tower.config,
        inputs_embeds=torch.zeros(features.shape[0], steps, 1, dtype=tower.conv1.weight.dtype, device=features.device),
        attention_mask=valid.long(),
    )
    hidden = tower(features, attention_mask=attention).last_hidden_state
    keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < out_lengths[:, None]
    return hidden[keep]


def embed(model, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token embeddings with the encoder outputs written over the placeholder tokens."""
    model = unwrap(model)
    embeds = model.get_input_embeddings()(input_ids)
    config = model.config
    for kind, token_id in (("audio", getattr(config, "audio_token_id", None)),
                           ("image", getattr(config, "image_token_id", None))):
        if kind not in media:
            continue
        mask = input_ids == token_id
        features = media[kind]
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(mask.sum())} {kind} placeholder tokens but {features.shape[0]} {kind} features")
        if kind == "audio" and hasattr(model.model, "multi_modal_projector"):
            features = model.model.multi_modal_projector(features)
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
    return embeds


def position_ids(family: str, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Qwen2-Audio: positions count real tokens only (left padding), as generate() numbers them.
    Omni computes its 3-D rope positions itself from input_ids and the media sizes."""
    if family == "qwen2_5_omni":
        return None
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def forward_logits(model, family: str, input_ids, attention_mask, inputs_embeds, extra: dict, keep: int = 0):
    """Logits for already-merged embeddings; only the last `keep` positions when keep > 0 (the completion), which
    spares a (batch, prompt length, vocabulary) tensor. `extra` holds the media sizes Omni needs for positions."""
    model = unwrap(model)
    hidden = model.model(
        input_ids=None if family == "text" else input_ids,  # a text-only LM (benchmarks) takes one of the two
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        position_ids=position_ids(family, attention_mask),
        use_cache=False,
        **rope_inputs(family, extra),
    ).last_hidden_state
    return model.lm_head(hidden[:, -keep:] if keep else hidden)


def rope_inputs(family: str, batch: dict) -> dict:
    """The media sizes Omni's 3-D rope positions are computed from (Qwen2-Audio needs none)."""
    if family != "qwen2_5_omni":
        return {}
    return {k: batch[k] for k in ("feature_attention_mask", "image_grid_thw") if k in batch}


def repeat_prompts(batch: dict, repeats: int) -> dict:
    """Each per-prompt tensor repeated `repeats` times, grouped contiguously (prompt 0 x G, prompt 1 x G, ...)."""
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in batch.items() if k in PER_PROMPT_KEYS}
