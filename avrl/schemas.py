"""Typed schemas (Hydra ConfigStore) for the config groups whose options all share one set of keys: `model`,
`optim`, and the LoRA adapter block. Each group's YAML extends its schema, so a misspelt key in a YAML file or on
the command line fails at compose time with the key's name, and a value of the wrong type is refused.

Not (yet) schemas: `algorithm` (GRPO and SFT differ, and a paper preset's GRPO keys meet algorithm=sft in the
RL-vs-SFT sweep), `data` (readers take different keys) and `trainer` (Lightning's own arguments).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING  # an entry of avrl/models/families
    name_or_path: str = MISSING  # local folder or hub id
    processor_path: Optional[str] = None  # the tokenizer/feature extractor's folder when not name_or_path
    revision: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False
    freeze_audio_encoder: bool = False
    freeze_vision_encoder: bool = True
    images: bool = False
    trust_remote_code: bool = False
    default_lr: float = 1.0e-3


@dataclass
class OptimConfig:
    lr: float = MISSING
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_skipped_in_row: int = 10


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    include_audio_encoder: bool = False
    merge_on_save: bool = False


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="model", name="_schema", node=ModelConfig)
    store.store(group="optim", name="_schema", node=OptimConfig)
    store.store(group="algorithm", name="_lora_schema", node=LoraConfig)


__all__ = ["LoraConfig", "ModelConfig", "OptimConfig", "register"]
