"""Qwen3-Omni's thinker (Qwen/Qwen3-Omni-30B-A3B-Instruct, transformers 5.x): a chunked audio encoder (three
stride-2 convolutions per 100-frame window), a vision encoder with deepstack features, and a mixture-of-experts
Qwen3 LM with 3-D rope. The talker and code2wav weights of the checkpoint are never loaded.

Audio only for now: Qwen3-Omni injects multi-scale ("deepstack") vision features into the first LM layers, which
avrl's embed-once path does not feed, so this family declares no image token and an image config is refused.
"""

from __future__ import annotations

import torch
from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

from avrl.models.families.base import Family
from avrl.models.families.qwen2_5_omni import THINKER_RENAMES, encode_audio
from avrl.models.templates import QWEN3_OMNI
from avrl.models.tiny_sizes import audio_config, text_config

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
)
WINDOW_FRAMES = 100  # the encoder's chunk: 2 * n_window mel frames (n_window = 50 in the published config)


def audio_token_count(num_mel_frames: torch.Tensor) -> torch.Tensor:
    """Encoder outputs for a clip: 13 per full 100-frame window (three stride-2 convolutions: 100 -> 50 -> 25 -> 13)
    plus the same rule on the remainder, as Qwen3OmniMoeProcessor counts them."""
    rest = num_mel_frames % WINDOW_FRAMES
    rest = (rest - 1) // 2 + 1
    rest = ((rest - 1) // 2 + 1 - 1) // 2 + 1
    return rest + (num_mel_frames // WINDOW_FRAMES) * 13


def split_experts(name: str, tensor: torch.Tensor):
    """transformers 5 holds each layer's experts fused (gate_up_proj: (experts, 2 * inner, hidden), gate rows
    first; down_proj: (experts, hidden, inner)); the checkpoint, and so vLLM, has one set of weights per expert."""
    if name.endswith("mlp.experts.gate_up_proj"):
        prefix, inner = name.removesuffix("gate_up_proj"), tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            yield f"{prefix}{e}.gate_proj.weight", tensor[e, :inner]
            yield f"{prefix}{e}.up_proj.weight", tensor[e, inner:]
    elif name.endswith("mlp.experts.down_proj"):
        prefix = name.removesuffix("down_proj")
        for e in range(tensor.shape[0]):
            yield f"{prefix}{e}.down_proj.weight", tensor[e]
    else:
        yield name, tensor


def build_tiny(tokenizer, hidden: int = 64):
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3OmniMoeThinkerConfig(
        audio_config=audio_config(
            hidden,
            output_dim=hidden,
            n_window=WINDOW_FRAMES // 2,
            n_window_infer=400,
            downsample_hidden_size=16,
            max_source_positions=1500,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=hidden,
            patch_size=16,
            deepstack_visual_indexes=[0],
            num_position_embeddings=64,
        ),
        text_config=text_config(
            tokenizer,
            hidden,
            head_dim=hidden // 4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "rope_theta": 1e6,
                "mrope_interleaved": True,
            },
        ),
        audio_token_id=ids("<|audio_pad|>"),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        audio_start_token_id=ids("<|audio_start|>"),
        audio_end_token_id=ids("<|audio_end|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        user_token_id=ids("<|im_start|>"),
    )
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    # At transformers' init (std 0.02) each of the three small convolutions shrinks its input ~10x, so a random tiny
    # encoder's output hardly depends on the audio (a 200 Hz and a 2 kHz tone differ by 1e-4 of the output, against
    # 0.06 for the tiny Qwen2-Audio) and GRPO has nothing to learn from. He initialisation keeps the signal.
    tower = model.model.audio_tower
    for layer in (tower.conv2d1, tower.conv2d2, tower.conv2d3, tower.conv_out):
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        if layer.bias is not None:
            torch.nn.init.zeros_(layer.bias)
    return model, None


FAMILY = Family(
    name="qwen3_omni",
    model_class="Qwen3OmniMoeThinkerForConditionalGeneration",
    chat_template=QWEN3_OMNI,
    special_tokens=SPECIAL_TOKENS,
    audio_token="<|audio_pad|>",
    image_token=None,
    audio_token_count=audio_token_count,
    encode_audio=encode_audio,
    checkpoint_renames=THINKER_RENAMES,
    build_tiny=build_tiny,
    checkpoint_tensors=split_experts,
    rope_from_media=True,
    # Chunked encoder (100-frame windows, attention over n_window_infer frames); Qwen3OmniMoeProcessor pads to the
    # longest clip without truncation: any length encodes.
    long_audio=True,
)
