"""One GRPO step of a Qwen2-Audio model timed by phase (rollout / reference log-probs / update), as GRPOModule runs
it: used by `python -m avrl.bench gpu` (Qwen2-Audio-7B-Instruct's real sizes) and `python -m avrl.bench prefix`
(CPU sizes, 30 s of audio, shared vs repeated prefix).

`gpu` — R1-AQA's per-device batch on avrl/assets/shapes/qwen2_audio_7b with random bf16 weights, gradient
checkpointing and LoRA adapters: 2 prompts x G = 8 completions, 10 s of audio per prompt, 256 completion tokens
(the stop token is one the model cannot emit, so every completion has the full length and the figure is stable).
Reported: seconds per step by phase (at num_iterations 1 avrl computes no separate old log-probs, so neither does
this step), peak GPU memory, completion tokens per second, and GPU-hours per 1,000 steps on 8 GPUs (each GPU runs
its own per-device batch; communication not counted) next to the paper's 4-5 h on 8 H800 (32-40 GPU-hours), for the
shared-prefix and the repeated path. `--smoke` runs the same code on the tiny Qwen2-Audio's sizes (on CPU when there
is no GPU): the tests check that the code path works; its timings mean nothing. Not yet measured here: full
fine-tuning with an offloaded optimizer (ZeRO-2/3), the Qwen2.5-Omni thinker with an image.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

ASSETS = Path(__file__).parent / "assets"
PAPER_GPU_HOURS = (32, 40)  # R1-AQA: 4-5 h on 8 H800 for its 1,000 steps (README of xiaomi-research/r1-aqa)
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "include_audio_encoder": False}


class _Processor:
    """What Policy needs of a processor when the batch is built directly: a stop token the model never emits."""

    def __init__(self, vocab_size: int):
        self.stop_token_ids = [vocab_size + 1]
        self.tokenizer = SimpleNamespace(pad_token_id=0)

    def decode(self, ids):
        return [""] * len(ids)


def audio_batch(config, prompts: int, audio_seconds: float, device) -> dict:
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


def build(config, device, dtype, checkpointing: bool):
    """A randomly initialised Qwen2-Audio of `config`'s sizes, its audio encoder frozen."""
    from transformers import Qwen2AudioForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in bf16: a 7B model in fp32 would take 34 GB first
    try:
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.model.audio_tower.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def measure_step(model, config, *, prompts: int, G: int, length: int, audio_seconds: float, steps: int,
                 shared_prefix: bool, lora: bool) -> dict:
    """Median seconds per phase over the steps after the first (the first warms up), and peak memory."""
    from avrl.algorithms.grpo import grpo_loss
    from avrl.models import families
    from avrl.policy import Policy

    device = next(model.parameters()).device
    policy = Policy(model, _Processor(config.text_config.vocab_size), families.get("qwen2_audio"),
                    shared_prefix=shared_prefix)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batch = audio_batch(config, prompts, audio_seconds, device)
    settings = {"max_new_tokens": length, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    phases = {"rollout": [], "reference_logps": [], "update": []}
    for step in range(steps):
        with torch.no_grad():
            media = policy.encode(batch)  # the encoder is frozen: its outputs serve all three phases
        keys = list(range(step * prompts * G, (step + 1) * prompts * G))
        (ids, mask), seconds = timed(lambda: policy.generate(batch, media, G, settings, keys=keys), device)
        phases["rollout"].append(seconds)

        def reference():
            # With LoRA the reference is the base (adapters off); otherwise a frozen copy, here the same weights.
            with torch.no_grad(), (model.disable_adapter() if lora else contextlib.nullcontext()):
                return policy.completion_logps(batch, media, ids, mask, G)[0]

        ref, seconds = timed(reference, device)
        phases["reference_logps"].append(seconds)
        advantages = torch.randn(prompts * G, device=device)

        def update():  # as GRPOModule.update at num_iterations 1: the old log-probs are the update's own, detached
            optimizer.zero_grad()
            logps, _ = policy.completion_logps(batch, media, ids, mask, G)
            loss, _ = grpo_loss(logps, logps.detach(), ref, advantages, mask, beta=0.04, epsilon=0.2)
            loss.backward()
            optimizer.step()

        _, seconds = timed(update, device)
        phases["update"].append(seconds)
    median = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in phases.items()}
    return {"seconds_by_phase": median, "step_seconds": sum(median.values()),
            "prompt_tokens": int(batch["input_ids"].shape[1]),
            "peak_memory_mb": peak_memory_mb(device)}


def peak_memory_mb(device) -> float:
    """CUDA max allocated on a GPU, else the process's peak RSS (run one measurement per process)."""
    import resource

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_gpu(smoke: bool) -> dict:
    """`python -m avrl.bench gpu`: R1-AQA's step at Qwen2-Audio-7B's sizes, shared and repeated prefix."""
    from transformers import Qwen2AudioConfig

    from avrl.models.lora import apply_lora

    if not torch.cuda.is_available() and not smoke:
        raise SystemExit("python -m avrl.bench gpu needs a CUDA device (use --smoke to run its code path on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts, G, length, steps = (2, 8, 256, 3) if not smoke else (1, 2, 4, 1)
    config = Qwen2AudioConfig.from_pretrained(ASSETS / ("tiny_qwen2_audio" if smoke else "shapes/qwen2_audio_7b"))
    model = apply_lora(build(config, device, dtype, checkpointing=True), OmegaConf.create(LORA))
    result = {
        "shape": "tiny (smoke)" if smoke else "Qwen2-Audio-7B-Instruct (avrl/assets/shapes/qwen2_audio_7b)",
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype), "device": str(device),
        "prompts": prompts, "G": G, "completion_tokens": length, "audio_seconds": 10.0, "lora_r": LORA["r"],
        "gradient_checkpointing": True, "steps": steps, "paper_gpu_hours": PAPER_GPU_HOURS,
    }
    for shared in (True, False):
        r = measure_step(model, config, prompts=prompts, G=G, length=length, audio_seconds=10.0, steps=steps,
                         shared_prefix=shared, lora=True)
        r["completion_tokens_per_second"] = prompts * G * length / r["step_seconds"]
        r["gpu_hours_per_1000_steps_on_8_gpus"] = r["step_seconds"] * 1000 * 8 / 3600
        result["shared_prefix" if shared else "repeated_prefix"] = r
        phase = r["seconds_by_phase"]
        print(f"  {result['shape']}, {'shared' if shared else 'repeated'} prefix: {r['step_seconds']:.2f} s/step "
              f"(rollout {phase['rollout']:.2f}, reference {phase['reference_logps']:.2f}, update "
              f"{phase['update']:.2f}); {r['completion_tokens_per_second']:.0f} completion tokens/s; "
              f"~{r['gpu_hours_per_1000_steps_on_8_gpus']:.0f} GPU-hours per 1,000 steps on 8 GPUs "
              f"(paper: {PAPER_GPU_HOURS[0]}-{PAPER_GPU_HOURS[1]})", flush=True)
    return result
