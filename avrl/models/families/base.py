"""What avrl needs to know about one model family, as one record (see __init__.py for the registry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # the transformers class avrl trains (for Omni models: the thinker alone)
    chat_template: str  # verbatim from the published checkpoint (avrl/models/templates.py)
    special_tokens: tuple[str, ...]  # the tokenizer's special tokens; the tiny tokenizer is built with them
    audio_token: str  # the placeholder the processor repeats once per audio encoder output
    image_token: str | None  # None: avrl feeds this family no images
    audio_token_count: Callable[[torch.Tensor], torch.Tensor]  # mel frames of a clip -> audio encoder outputs
    encode_audio: Callable  # (model, input_features, feature_attention_mask) -> (n_audio_tokens, d), flat
    checkpoint_renames: tuple[tuple[str, str], ...]  # in-memory parameter prefix -> hub checkpoint prefix (vLLM)
    build_tiny: Callable  # (tokenizer, hidden) -> (randomly initialised model, image processor or None)
    # In-memory tensor -> the checkpoint's tensors, after the renames (transformers 5 fuses MoE experts in memory).
    checkpoint_tensors: Callable | None = None
    rope_from_media: bool = False  # the model computes its 3-D rope positions from input_ids and media sizes
    forward_takes_input_ids: bool = True  # the base model accepts input_ids next to inputs_embeds
    # The audio encoder encodes a clip of any length (in windows): clips go in whole, up to data.max_audio_seconds.
    # False: the feature extractor cuts each clip at its window (30 s), as the family's processor does.
    long_audio: bool = False

    def transformers_class(self):
        return getattr(transformers, self.model_class)

    def rope_inputs(self, batch: dict) -> dict:
        """The media sizes a 3-D rope needs, passed to the base model's forward and to generate()."""
        if not self.rope_from_media:
            return {}
        return {k: batch[k] for k in ("feature_attention_mask", "image_grid_thw") if k in batch}

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """1-D rope: positions count real tokens only (left padding), as generate() numbers them. A 3-D rope's
        positions are computed by the model itself."""
        if self.rope_from_media:
            return None
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
