"""The tiny models' sizes, shared by every family's tiny builder (avrl/models/families) and the tiny checkpoint
CLI (avrl/models/tiny.py). The tiny audio window is 2 s (the real one is 30 s) so that CPU runs take minutes."""

from __future__ import annotations

from transformers import WhisperFeatureExtractor

WINDOW_SECONDS = 2
MEL_BINS = 128


def text_config(tokenizer, hidden: int, **extra) -> dict:
    """The tiny language model's sizes, shared by every family's builder (avrl/models/families)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def audio_config(hidden: int, **extra) -> dict:
    """The tiny audio encoder's sizes, shared by every family's builder; the family adds its own keys."""
    return dict(
        d_model=hidden,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=4 * hidden,
        num_mel_bins=MEL_BINS,
        **extra,
    )


def feature_extractor() -> WhisperFeatureExtractor:
    """Whisper's log-mel features over the tiny models' 2 s window."""
    return WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=WINDOW_SECONDS)
