"""Which backend samples the rollouts (`rollout=hf|vllm`, conf/rollout/).

`hf` samples with the policy's own transformers generate() and the keyed sampler (avrl/rollout.py); `vllm`
(avrl/vllm_rollout.py, GPU only) with a colocated vLLM engine that also reports each token's sampling
log-probability and takes the policy's weights after every update (`sync`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from avrl.rollout import HFRollout
from avrl.vllm_rollout import VLLMRollout


def build_rollout(rollout_cfg: DictConfig, model_cfg: DictConfig, algo: DictConfig, processor):
    backend = rollout_cfg.backend
    if backend == "hf":
        return HFRollout(algo)
    if backend == "vllm":
        return VLLMRollout(model_cfg, algo, rollout_cfg, processor.stop_token_ids, processor.tokenizer.pad_token_id)
    raise ValueError(f"rollout.backend must be 'hf' or 'vllm', got {backend!r}")
