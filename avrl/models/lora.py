"""PEFT LoRA adapters on the language model (and optionally the audio encoder) of any family."""

from __future__ import annotations

from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model


def target_pattern(cfg: DictConfig) -> str:
    """A regex over module names: the LM's attention projections, plus the audio encoder's if asked."""
    names = "|".join(cfg.target_modules)
    parts = [rf".*language_model.*\.({names})"]
    if cfg.include_audio_encoder:
        parts.append(r".*audio_tower.*\.(q_proj|k_proj|v_proj|out_proj)")
    return "|".join(f"(?:{p})" for p in parts)


def apply_lora(model, cfg: DictConfig):
    """The model wrapped with fresh LoRA adapters; only adapter weights train."""
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_pattern(cfg), bias="none"
    )
    return get_peft_model(model, config)
