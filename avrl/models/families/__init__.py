"""Model families: everything avrl knows about one architecture, in one entry of this registry.

A family holds its transformers class, chat template, special tokens, audio token-count rule, audio encoder call,
rope inputs, vLLM checkpoint names and tiny-model builder (see base.Family). The rest of avrl asks the family and
never tests a family's name, so a new family is one module here plus its `conf/model/` files.
"""

from __future__ import annotations

from avrl.models.families import qwen2_5_omni, qwen2_audio, qwen3_omni
from avrl.models.families.base import Family

REGISTRY: dict[str, Family] = {f.name: f for f in (qwen2_audio.FAMILY, qwen2_5_omni.FAMILY, qwen3_omni.FAMILY)}


def get(name: str) -> Family:
    if name not in REGISTRY:
        raise ValueError(f"unknown model.family {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["Family", "REGISTRY", "get"]
