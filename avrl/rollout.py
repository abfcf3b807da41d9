"""Rollout backends (`rollout=hf|vllm`, conf/rollout/): one `generate(policy, batch, media, G, keys) -> Rollout`.

`hf` samples with the policy's own transformers generate() and the keyed sampler; `vllm` (avrl/vllm_rollout.py,
GPU only) with a colocated vLLM engine that also reports each token's sampling log-probability and takes the
policy's weights after every update (`sync`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig


@dataclass
class Rollout:
    ids: torch.Tensor  # (prompts * G, T) completion tokens, grouped by prompt
    mask: torch.Tensor  # 1 up to and including each completion's first stop token
    texts: list[str]
    truncated: torch.Tensor  # (prompts * G,) True where no stop token was emitted
    sampling_logps: torch.Tensor | None = None  # per-token log-probs under the engine that sampled (vLLM)


def sampling_settings(algo: DictConfig) -> dict:
    """The algorithm's sampling settings under generate()'s names."""
    return {"max_new_tokens": algo.max_completion_length, "temperature": algo.temperature, "top_p": algo.top_p,
            "top_k": algo.get("top_k", 0)}


class HFRollout:
    """Sampling with the trained model itself (transformers generate, keyed streams)."""

    def __init__(self, algo: DictConfig):
        self.settings = sampling_settings(algo)

    def generate(self, policy, batch: dict, media: dict, G: int, keys: list[int]) -> Rollout:
        ids, mask = policy.generate(batch, media, G, self.settings, keys=keys)
        return Rollout(ids, mask, policy.decode(ids, mask), ~policy.stopped(ids))

    def sync(self, model) -> None:
        """Nothing to do: the next rollout samples from the model being trained."""


def build_rollout(rollout_cfg: DictConfig, model_cfg: DictConfig, algo: DictConfig, processor):
    backend = rollout_cfg.get("backend", "hf")
    if backend == "hf":
        return HFRollout(algo)
    if backend == "vllm":
        from avrl.vllm_rollout import VLLMRollout

        return VLLMRollout(model_cfg, algo, rollout_cfg, processor.stop_token_ids, processor.tokenizer.pad_token_id)
    raise ValueError(f"rollout.backend must be 'hf' or 'vllm', got {backend!r}")
