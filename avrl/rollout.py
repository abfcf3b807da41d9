"""What a rollout returns (`Rollout`) and the `hf` backend: sampling with the policy's own transformers generate()
and the keyed sampler. Every backend has `generate(policy, batch, media, G, keys) -> Rollout`; the `vllm` one is in
avrl/vllm_rollout.py, and avrl/rollout_backends.py picks one from `rollout=hf|vllm` (conf/rollout/).
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
    return {
        "max_new_tokens": algo.max_completion_length,
        "temperature": algo.temperature,
        "top_p": algo.top_p,
        "top_k": algo.top_k,
        "repetition_penalty": algo.repetition_penalty,
        "min_p": algo.min_p,
    }


class HFRollout:
    """Sampling with the trained model itself (transformers generate, keyed streams)."""

    def __init__(self, algo: DictConfig):
        self.settings = sampling_settings(algo)

    def generate(self, policy, batch: dict, media: dict, G: int, keys: list[int]) -> Rollout:
        ids, mask = policy.generate(batch, media, G, self.settings, keys=keys)
        return Rollout(ids, mask, policy.decode(ids, mask), ~policy.stopped(ids))

    def sync(self, model) -> None:
        """Nothing to do: the next rollout samples from the model being trained."""
