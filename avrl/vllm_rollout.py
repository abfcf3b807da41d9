"""Rollouts with vLLM (`rollout=vllm`; GPU only; `pip install -e ".[vllm]"`).

vLLM runs colocated with training in the same process (TRL's "colocate" mode): it generates the G completions of
every prompt, with the audio (and image) passed as multimodal data so that vLLM's own Qwen2-Audio / Qwen2.5-Omni
thinker implementation encodes it, and returns each sampled token's log-probability. After every optimizer update
the policy's weights are loaded into vLLM under the checkpoint names vLLM expects (`checkpoint_name`), LoRA
adapters added to their base weights.

Because vLLM's kernels differ from the training forward, the rollout policy is not exactly the trained policy;
`importance_weights` gives TRL's truncated importance-sampling correction for that mismatch. Each completion is
sampled with its own seed, the same row key the HF path uses (avrl/sampling.py), so rollouts do not depend on
batching here either.

What runs without a GPU (and is tested): the name mapping and the correction. The engine itself is exercised only
on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from avrl.models import families
from avrl.models.families import Family
from avrl.rollout import Rollout


def checkpoint_name(name: str, family: Family) -> str:
    """The hub checkpoint name of a parameter of avrl's in-memory model (PEFT wrapper names included), by the
    family's `checkpoint_renames`."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    for memory, checkpoint in family.checkpoint_renames:
        if name.startswith(memory):
            return checkpoint + name[len(memory) :]
    raise ValueError(f"parameter {name!r} of a {family.name} model has no checkpoint name")


def weights_for_sync(model, family: Family) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under checkpoint names. With LoRA each adapted weight is yielded as base + delta,
    computed out of place: merging into the model and unmerging after would leave float drift in the base
    weights at every sync."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):  # a PEFT LoRA layer
            for adapter in module.active_adapters:
                key = f"{name}.base_layer.weight"
                deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter)
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        name, tensor = checkpoint_name(name, family), (tensor + deltas[name]) if name in deltas else tensor
        yield from family.checkpoint_tensors(name, tensor) if family.checkpoint_tensors else ((name, tensor),)


def importance_weights(train_logps: torch.Tensor, sampling_logps: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token truncated importance weights min(pi_train / pi_vllm, cap) (TRL's vllm_importance_sampling_cap):
    they rescale the policy-gradient term of tokens vLLM sampled with a different probability."""
    return torch.exp(train_logps - sampling_logps).clamp(max=cap)


class VLLMRollout:
    """A colocated vLLM engine that samples the completions and takes the policy's weights after each update."""

    def __init__(self, model_cfg, algo, rollout_cfg, stop_token_ids: list[int], pad_token_id: int):
        if not torch.cuda.is_available():
            raise RuntimeError("rollout=vllm needs a CUDA GPU; on CPU use rollout=hf (the default)")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError('rollout=vllm needs vLLM: pip install -e ".[vllm]"') from e
        self.family, self.algo, self.cfg = families.get(model_cfg.family), algo, rollout_cfg
        self.stop_token_ids, self.pad_token_id = stop_token_ids, pad_token_id
        self.llm = LLM(
            model=str(model_cfg.name_or_path),
            dtype=model_cfg.dtype,
            seed=int(rollout_cfg.seed),
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            max_model_len=rollout_cfg.max_model_len,
            enable_sleep_mode=rollout_cfg.enable_sleep_mode,
            enable_prefix_caching=True,
            limit_mm_per_prompt={"audio": 1, "image": 1 if model_cfg.images else 0},
            distributed_executor_backend="external_launcher",  # one engine per training rank, in its process
            trust_remote_code=model_cfg.trust_remote_code,
        )

    def generate(self, policy, batch: dict, media: dict, G: int, keys: list[int]):
        """G completions per prompt, grouped contiguously, right-padded, with vLLM's sampling log-probs (the
        encoder outputs in `media` are not used: vLLM encodes the audio itself)."""
        ids, mask, logps = self._sample(
            batch["prompts"],
            [it.waveform for it in batch["items"]],
            batch.get("images"),
            keys,
            G,
            policy.processor.sampling_rate,
        )
        device = batch["input_ids"].device
        ids, mask, logps = ids.to(device), mask.to(device), logps.to(device)
        return Rollout(ids, mask, policy.decode(ids, mask), ~policy.stopped(ids), logps)

    def _sample(self, prompts: list[str], audios: list, images: list, keys: list[int], G: int, sampling_rate: int):
        from vllm import SamplingParams  # the vllm extra (GPU only): checked when the engine starts

        requests, params = [], []
        for i, prompt in enumerate(prompts):
            media = {"audio": (audios[i], sampling_rate)}
            if images and images[i] is not None:
                media["image"] = images[i]
            for g in range(G):
                requests.append({"prompt": prompt, "multi_modal_data": media})
                params.append(
                    SamplingParams(
                        temperature=self.algo.temperature,
                        top_p=self.algo.top_p,
                        top_k=self.algo.top_k or -1,
                        repetition_penalty=self.algo.repetition_penalty,  # over prompt and output, as transformers
                        min_p=self.algo.min_p,  # vLLM applies it before top-k/top-p (transformers: after)
                        max_tokens=self.algo.max_completion_length,
                        seed=keys[i * G + g],
                        logprobs=0,
                        stop_token_ids=self.stop_token_ids,
                        detokenize=False,
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        width = self.algo.max_completion_length
        ids = torch.full((len(outputs), width), self.pad_token_id, dtype=torch.long)
        logps = torch.zeros((len(outputs), width))
        mask = torch.zeros((len(outputs), width), dtype=torch.long)
        for row, out in enumerate(outputs):
            completion = out.outputs[0]
            n = len(completion.token_ids)
            ids[row, :n] = torch.tensor(completion.token_ids)
            logps[row, :n] = torch.tensor([lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)])
            mask[row, :n] = 1
        return ids, mask, logps

    @torch.no_grad()
    def sync(self, model) -> None:
        engine_model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        engine_model.load_weights(weights_for_sync(model, self.family))
        self.llm.reset_prefix_cache()
