"""Loads a model and its processor from a local folder or a hub id: the real checkpoints and the tiny ones alike."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from transformers import GenerationConfig
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.models.auto.configuration_auto import model_type_to_module_name

from avrl.models import families
from avrl.models.multimodal import audio_encoder, vision_encoder
from avrl.models.processing import AudioTextProcessor

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg: DictConfig, path: str | None = None):
    """The model described by a `model` config group entry; `path` overrides `cfg.name_or_path`."""
    source = str(path or cfg.name_or_path)
    family = families.get(cfg.family)
    if cfg.images and family.image_token is None:
        raise ValueError(
            f"model.images=true, but avrl feeds no images to the {family.name} family "
            f"(see avrl/models/families/{family.name}.py)"
        )
    hub = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if not Path(source).exists():
        log.info("loading %s from the hub (or its local cache)", source)

    if is_deepspeed_zero3_enabled():
        import_modeling_modules(family.transformers_class().config_class.from_pretrained(source, **hub))
    model = family.transformers_class().from_pretrained(
        source, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation, **hub
    )
    # Tools that size things from config.hidden_size (the HF Trainer's DeepSpeed "auto" values) find it only in
    # Omni's text_config: copy it up so nobody has to edit a config by hand (EchoInk-R1's users had to).
    if getattr(model.config, "hidden_size", None) is None:
        model.config.hidden_size = model.config.get_text_config().hidden_size
    # The checkpoint's own sampling settings (Qwen2-Audio-Instruct ships a repetition penalty and top_k) would be
    # merged into every generate() call by transformers but never into the log-probs: avrl samples only with the
    # config's algorithm/eval settings, as both papers' trainers do with a fresh GenerationConfig.
    model.generation_config = _special_tokens_only(model.generation_config)
    positions = getattr(audio_encoder(model), "embed_positions", None)
    if positions is not None:
        # Qwen2-Audio's sinusoidal position table is frozen when the model is built, but from_pretrained
        # (transformers 5) hands it back trainable; under ZeRO-3 it stays frozen. Frozen, as designed, everywhere.
        positions.requires_grad_(False)
    if cfg.freeze_audio_encoder and audio_encoder(model) is not None:
        # Qwen2-Audio's projector into the LM stays trainable; Omni's projection is part of its encoder.
        audio_encoder(model).requires_grad_(False)
    if cfg.freeze_vision_encoder and vision_encoder(model) is not None:
        vision_encoder(model).requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def import_modeling_modules(config) -> None:
    """Import the transformers modeling module of the model and of each of its sub-models, before ZeRO-3's
    zero.Init is entered.

    Workaround for DeepSpeed <= 0.19.8 with transformers >= 5.25 (kernels 0.19): a module first imported inside
    zero.Init has each nn.Module class's __init__ recorded by DeepSpeed's __init_subclass__ hook *before* the class
    decorators run, and put back when zero.Init exits. transformers 5.25 decorates attention classes with
    kernels' `use_kernelized_func`, whose new __init__ sets `_kernel_funcs`; DeepSpeed's restore drops it, so the
    next model built (the reference model, or the next run in the process) fails in forward with "'Qwen2Attention'
    object has no attribute '_kernel_funcs'". Qwen2-Audio builds its language model (modeling_qwen2) lazily inside
    __init__, which is how the import lands inside zero.Init. Imported here first, DeepSpeed records and restores
    the decorated __init__. Remove once DeepSpeed records __init__ after class creation (tests/test_models.py
    holds the case).
    """
    stack, seen = [config], set()
    while stack:
        config = stack.pop()
        module = model_type_to_module_name(config.model_type)
        if module not in seen:
            seen.add(module)
            importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        stack.extend(
            sub
            for key in getattr(config, "sub_configs", {})
            if (sub := getattr(config, key, None)) is not None and hasattr(sub, "model_type")
        )


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing, non-reentrant, and no KV cache in training forwards."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name from transformers 5.2x on
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


_SAID: set[str] = set()


def _special_tokens_only(config):
    keep = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    dropped = {
        k: v
        for k, v in config.to_diff_dict().items()
        if k not in keep and k not in ("transformers_version", "_from_model_config", "use_cache")
    }

    # Once, on rank 0 (the reference model is the same checkpoint; every rank loads it).
    if dropped and str(dropped) not in _SAID and rank_zero_only.rank == 0:
        _SAID.add(str(dropped))
        log.info("the checkpoint's generation_config %s is not used (sampling comes from the config)", dropped)
    return GenerationConfig(**{k: v for k, v in keep.items() if v is not None})


def load_processor(cfg: DictConfig, path: str | None = None) -> AudioTextProcessor:
    source = str(path or cfg.processor_path or cfg.name_or_path)
    return AudioTextProcessor.from_pretrained(
        source, family=families.get(cfg.family), with_images=cfg.images, revision=cfg.revision
    )
