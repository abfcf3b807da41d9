"""Qwen2-Audio (Qwen/Qwen2-Audio-7B-Instruct): a Whisper-style encoder, a projector, a Qwen2 LM with 1-D rope."""

from __future__ import annotations

import torch
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask

from avrl.models.families.base import Family
from avrl.models.templates import QWEN2_AUDIO
from avrl.models.tiny_sizes import WINDOW_SECONDS, audio_config, text_config

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
)


def audio_token_count(num_mel_frames: torch.Tensor) -> torch.Tensor:
    """Encoder output length for a clip of `num_mel_frames` (conv stride 2, then average pooling by 2): the rule of
    Qwen2AudioProcessor and Qwen2_5OmniProcessor."""
    after_conv = (num_mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def encode_audio(model, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    """As Qwen2AudioModel.forward does it: encode the padded window, keep each clip's valid outputs. The projector
    into the LM is applied when embedding (multimodal.embed), so that a frozen encoder's outputs can be reused while
    the projector trains."""
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


def build_tiny(tokenizer, hidden: int = 64):
    config = Qwen2AudioConfig(
        audio_config=audio_config(hidden, max_source_positions=WINDOW_SECONDS * 50),  # 100 frames/s, conv stride 2
        text_config=dict(model_type="qwen2", **text_config(tokenizer, hidden)),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    return Qwen2AudioForConditionalGeneration(config), None


FAMILY = Family(
    name="qwen2_audio",
    model_class="Qwen2AudioForConditionalGeneration",
    chat_template=QWEN2_AUDIO,
    special_tokens=SPECIAL_TOKENS,
    audio_token="<|AUDIO|>",
    image_token=None,
    audio_token_count=audio_token_count,
    encode_audio=encode_audio,
    # transformers 5 keeps the submodules under `model.` in memory and saves them under the checkpoint's names
    # (tests/test_vllm_rollout.py checks these against save_pretrained); vLLM loads checkpoint names.
    checkpoint_renames=(
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.audio_tower.", "audio_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ),
    build_tiny=build_tiny,
)
