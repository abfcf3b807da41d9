"""Qwen2.5-Omni's thinker (Qwen/Qwen2.5-Omni-7B, -3B): audio and vision encoders, a Qwen2 LM with 3-D rope. The
talker and token2wav weights of the checkpoint are never loaded."""

from __future__ import annotations

import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration, Qwen2VLImageProcessorPil

from avrl.models.families.base import Family
from avrl.models.families.qwen2_audio import SPECIAL_TOKENS, audio_token_count
from avrl.models.templates import QWEN2_5_OMNI
from avrl.models.tiny_sizes import audio_config, text_config

# avrl loads the thinker alone; the hub checkpoint holds it under "thinker." (Qwen3-Omni's too).
THINKER_RENAMES = (
    ("model.language_model.", "thinker.model."),
    ("lm_head.", "thinker.lm_head."),
    ("model.audio_tower.", "thinker.audio_tower."),
    ("model.visual.", "thinker.visual."),
)


def encode_audio(model, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    """The thinker's own audio path (its projection into the LM is part of the encoder)."""
    return model.model.get_audio_features(features, feature_mask, return_dict=True).last_hidden_state


def build_tiny(tokenizer, hidden: int = 64):
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5OmniThinkerConfig(
        audio_config=audio_config(hidden, output_dim=hidden, n_window=50, max_source_positions=1500),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
        ),
        text_config=text_config(
            tokenizer, hidden, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}
        ),
        audio_token_id=ids("<|AUDIO|>"),
        image_token_id=ids("<|IMAGE|>"),
        video_token_id=ids("<|VIDEO|>"),
        audio_start_token_id=ids("<|audio_bos|>"),
        audio_end_token_id=ids("<|audio_eos|>"),
        vision_start_token_id=ids("<|vision_bos|>"),
        vision_end_token_id=ids("<|vision_eos|>"),
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return Qwen2_5OmniThinkerForConditionalGeneration(config), image_processor


FAMILY = Family(
    name="qwen2_5_omni",
    model_class="Qwen2_5OmniThinkerForConditionalGeneration",
    chat_template=QWEN2_5_OMNI,
    special_tokens=SPECIAL_TOKENS,
    audio_token="<|AUDIO|>",
    image_token="<|IMAGE|>",
    audio_token_count=audio_token_count,
    encode_audio=encode_audio,
    checkpoint_renames=THINKER_RENAMES,
    build_tiny=build_tiny,
    rope_from_media=True,
    # Its encoder runs in 100-frame windows (attention within each, positions restarting in each), so any length
    # encodes; transformers' Qwen2_5OmniProcessor cuts at 30 s (max_length padding), avrl does not (docs/models.md).
    long_audio=True,
)
