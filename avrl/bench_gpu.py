"""`python -m avrl.bench gpu`: one R1-AQA GRPO step on Qwen2-Audio-7B-Instruct's architecture at its real sizes
(avrl/assets/shapes/qwen2_audio_7b, random bf16 weights, gradient checkpointing, LoRA adapters), timed by phase.

R1-AQA's per-device batch: 2 prompts x G = 8 completions, 10 s of audio per prompt, 256 completion tokens (the stop
token is one the model cannot emit, so every completion has the full length and the figure is stable). Reported:
seconds per step split into rollout / reference log-probs / update (at num_iterations 1 avrl computes no separate
old log-probs, so neither does this step), peak GPU memory, completion tokens per second, and GPU-hours per 1,000
steps on 8 GPUs (each GPU runs its own per-device batch; communication not counted) next to the paper's 4-5 h on
8 H800 (32-40 GPU-hours).

`--smoke` runs the same code on the tiny Qwen2-Audio's sizes (on CPU when there is no GPU): the tests check that
the code path works; its timings mean nothing. Not yet measured here: full fine-tuning with an offloaded optimizer
(ZeRO-2/3), the Qwen2.5-Omni thinker with an image, shared-prefix GRPO.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

ASSETS = Path(__file__).parent / "assets"
PAPER_GPU_HOURS = (32, 40)  # R1-AQA: 4-5 h on 8 H800 for its 1,000 steps (README of xiaomi-research/r1-aqa)


class _Processor:
    """What Policy needs of a processor when the batch is built directly: a stop token the model never emits."""

    def __init__(self, vocab_size: int):
        self.stop_token_ids = [vocab_size + 1]
        self.tokenizer = SimpleNamespace(pad_token_id=0)

    def decode(self, ids):
        return [""] * len(ids)


def _batch(config, prompts: int, audio_seconds: float, device) -> dict:
    """Token ids with one audio placeholder block per prompt (Qwen2-Audio's count for the clip), random features."""
    from avrl.models.families.qwen2_audio import audio_token_count

    window = config.audio_config.max_source_positions * 2  # mel frames in the encoder's window (30 s: 3,000)
    frames = min(int(audio_seconds * 100), window)
    n_audio = int(audio_token_count(torch.tensor(frames)))
    text = torch.randint(10, min(1000, config.text_config.vocab_size // 2), (prompts, 40))  # below the special tokens
    audio = torch.full((prompts, n_audio), config.audio_token_id)
    feature_mask = torch.zeros(prompts, window, dtype=torch.long)
    feature_mask[:, :frames] = 1
    return {"input_ids": torch.cat([text[:, :20], audio, text[:, 20:]], dim=1).to(device),
            "attention_mask": torch.ones(prompts, 40 + n_audio, dtype=torch.long, device=device),
            "input_features": torch.randn(prompts, config.audio_config.num_mel_bins, window, device=device),
            "feature_attention_mask": feature_mask.to(device)}


def _build(shape: str, device, dtype):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    folder = "shapes/qwen2_audio_7b" if shape == "7b" else "tiny_qwen2_audio"
    config = Qwen2AudioConfig.from_pretrained(ASSETS / folder)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in bf16: a 7B model in fp32 would take 34 GB first
    try:
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return config, model


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(smoke: bool) -> dict:
    from avrl.algorithms.grpo import grpo_loss
    from avrl.models import families
    from avrl.models.lora import apply_lora
    from avrl.policy import Policy

    if not torch.cuda.is_available() and not smoke:
        raise SystemExit("python -m avrl.bench gpu needs a CUDA device (use --smoke to run its code path on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts, G, length, steps = (2, 8, 256, 3) if not smoke else (1, 2, 4, 1)
    config, model = _build("tiny" if smoke else "7b", device, dtype)
    lora = OmegaConf.create({"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"],
                             "include_audio_encoder": False})
    model = apply_lora(model, lora)
    policy = Policy(model, _Processor(config.text_config.vocab_size), families.get("qwen2_audio"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batch = _batch(config, prompts, 10.0, device)
    settings = {"max_new_tokens": length, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    phases = {"rollout": [], "reference_logps": [], "update": []}
    for step in range(steps):
        media = policy.encode(batch)
        keys = list(range(step * prompts * G, (step + 1) * prompts * G))
        (ids, mask), seconds = _timed(lambda: policy.generate(batch, media, G, settings, keys=keys), device)
        phases["rollout"].append(seconds)

        def reference():
            with torch.no_grad(), model.disable_adapter():  # LoRA: the reference is the base, adapters off
                return policy.completion_logps(batch, media, ids, mask, G)[0]

        ref, seconds = _timed(reference, device)
        phases["reference_logps"].append(seconds)
        advantages = torch.randn(prompts * G, device=device)

        # As GRPOModule.update does it at num_iterations 1: no separate old log-probs (the update's own, detached),
        # and the rollout's encoder outputs reused (LoRA leaves the audio encoder frozen).
        def update():
            optimizer.zero_grad()
            logps, _ = policy.completion_logps(batch, media, ids, mask, G)
            loss, _ = grpo_loss(logps, logps.detach(), ref, advantages, mask, beta=0.04, epsilon=0.2)
            loss.backward()
            optimizer.step()

        _, seconds = _timed(update, device)
        phases["update"].append(seconds)
    median = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in phases.items()}
    step_seconds = sum(median.values())
    gpu_hours = step_seconds * 1000 * 8 / 3600
    result = {
        "shape": "tiny (smoke)" if smoke else "Qwen2-Audio-7B-Instruct (avrl/assets/shapes/qwen2_audio_7b)",
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype), "device": str(device),
        "prompts": prompts, "G": G, "completion_tokens": length, "audio_seconds": 10.0, "lora_r": 8,
        "gradient_checkpointing": True, "steps": steps, "seconds_by_phase": median, "step_seconds": step_seconds,
        "completion_tokens_per_second": prompts * G * length / step_seconds,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "gpu_hours_per_1000_steps_on_8_gpus": gpu_hours, "paper_gpu_hours": PAPER_GPU_HOURS,
    }
    print(f"  {result['shape']}: {step_seconds:.2f} s/step (rollout {median['rollout']:.2f}, reference "
          f"{median['reference_logps']:.2f}, update {median['update']:.2f}); "
          f"{result['completion_tokens_per_second']:.0f} completion tokens/s; "
          f"~{gpu_hours:.0f} GPU-hours per 1,000 steps on 8 GPUs (paper: {PAPER_GPU_HOURS[0]}-{PAPER_GPU_HOURS[1]})",
          flush=True)
    return result
