"""Tiny, randomly initialised models of the real architecture classes, built offline.

`python -m avrl.models.tiny OUT_DIR --family qwen2_audio` writes a checkpoint folder that loads with the same code
as Qwen/Qwen2-Audio-7B-Instruct: config, safetensors weights, a byte-level BPE tokenizer trained here on the
project's prompts (with the real special tokens and chat template) and a Whisper feature extractor.
The tiny audio window is 2 s (the real one is 30 s) so that CPU runs take minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor

from avrl.data.synthetic import QUESTIONS
from avrl.models.processing import AudioTextProcessor
from avrl.models.templates import BY_FAMILY

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
]
WINDOW_SECONDS = 2
MEL_BINS = 128
PROMPT_TEMPLATES = [
    "{question} Please choose the answer from the following options: {choices}. "
    "Output the final answer in <answer> </answer>.",
    "{question} Please choose the answer from the following options: {choices}. "
    "Output the thinking process in <think> </think> and final answer in <answer> </answer>.",
    "{question} Options:\n{options}\nPlease think about this question as if you were a human pondering deeply. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between "
    "the <answer> </answer> tags. Please provide only the single option letter (e.g., A, B, C, D, etc.) "
    "within the <answer> </answer> tags.",
]


def _corpus() -> list[str]:
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: ",
             "<|im_end|>\n<|im_start|>assistant\n"]
    for question, choices in QUESTIONS.values():
        options = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
        for template in PROMPT_TEMPLATES:
            texts.append(template.format(question=question, choices=str(choices), options=options))
        for i, choice in enumerate(choices):
            texts += [f"<answer>{choice}</answer>", f"<answer>{chr(65 + i)}</answer>",
                      f"<think>The audio sounds {choice}.</think><answer>{choice}</answer>"]
    return texts * 20


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    return fast


def _text_config(tokenizer, hidden: int, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **extra,
    )


def build_qwen2_audio(tokenizer, hidden: int = 64):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(
        audio_config=dict(
            d_model=hidden, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=4 * hidden,
            num_mel_bins=MEL_BINS, max_source_positions=WINDOW_SECONDS * 50,  # 100 frames/s, conv stride 2
        ),
        text_config=dict(model_type="qwen2", **_text_config(tokenizer, hidden)),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    return Qwen2AudioForConditionalGeneration(config)


def build_qwen2_5_omni_thinker(tokenizer, hidden: int = 64):
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            d_model=hidden, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=4 * hidden,
            num_mel_bins=MEL_BINS, output_dim=hidden, n_window=50, max_source_positions=1500,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=hidden, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0],
        ),
        text_config=_text_config(
            tokenizer, hidden, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}
        ),
        audio_token_id=ids("<|AUDIO|>"), image_token_id=ids("<|IMAGE|>"), video_token_id=ids("<|VIDEO|>"),
        audio_start_token_id=ids("<|audio_bos|>"), audio_end_token_id=ids("<|audio_eos|>"),
        vision_start_token_id=ids("<|vision_bos|>"), vision_end_token_id=ids("<|vision_eos|>"),
    )
    return Qwen2_5OmniThinkerForConditionalGeneration(config)


def build(out_dir: str | Path, family: str = "qwen2_audio", seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `family` to `out_dir` and return the path."""
    torch.manual_seed(seed)
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    feature_extractor = WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=WINDOW_SECONDS)
    image_processor = None
    if family == "qwen2_audio":
        model = build_qwen2_audio(tokenizer)
    elif family == "qwen2_5_omni":
        from transformers import Qwen2VLImageProcessorPil

        model = build_qwen2_5_omni_thinker(tokenizer)
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(BY_FAMILY)}")
    model.save_pretrained(out)
    AudioTextProcessor(tokenizer, feature_extractor, image_processor, family).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2_audio", choices=sorted(BY_FAMILY))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out_dir, args.family, args.seed))


if __name__ == "__main__":
    main()
