"""One GRPO step of an audio model timed by phase (rollout / reference log-probs / update), as GRPOModule runs it:
used by `python -m benchmarks.speed gpu` (the 7B models' real sizes) and `python -m benchmarks.speed prefix` (CPU
sizes, 30 s of audio, shared vs repeated prefix).

`gpu` — R1-AQA's per-device batch with random bf16 weights, gradient checkpointing and LoRA adapters, on two
shapes: Qwen2-Audio-7B-Instruct (avrl/assets/shapes/qwen2_audio_7b; 10 s of audio per prompt) and the
Qwen2.5-Omni-7B thinker (avrl/assets/shapes/qwen2_5_omni_7b_thinker; 10 s of audio and a 448 x 448 image per
prompt, as EchoInk-R1's audio-visual questions). 2 prompts x G = 8 completions, 256 completion tokens (the stop
token is one the model cannot emit, so every completion has the full length and the figure is stable). Reported:
seconds per step by phase (at num_iterations 1 avrl computes no separate old log-probs, so neither does this step),
peak GPU memory, completion tokens per second, and GPU-hours per 1,000 steps on 8 GPUs (each GPU runs its own
per-device batch; communication not counted) next to R1-AQA's 4-5 h on 8 H800 (32-40 GPU-hours), for the
shared-prefix and the repeated path. Full fine-tuning: DeepSpeed's own estimate of the model states' memory for
ZeRO-2/3 with and without offload, on 1 GPU and on 8 GPUs per node, against this machine's GPU and host memory
(the 8.4B model fits no ZeRO configuration of one 141 GB GPU with 128 GiB of host memory). `--smoke` runs the
same code on the tiny models' sizes (on CPU when there is no GPU): the tests check that the code path works; its
timings mean nothing.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from avrl.config import ASSETS

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


# name -> (family, the real sizes, the tiny sizes for --smoke, an image with each prompt's audio)
SHAPES = {
    "qwen2_audio_7b": ("qwen2_audio", "shapes/qwen2_audio_7b", "tiny_qwen2_audio", False),
    "qwen2_5_omni_7b_thinker": ("qwen2_5_omni", "shapes/qwen2_5_omni_7b_thinker", "tiny_qwen2_5_omni", True),
}
# pixels: 448 is 32 x 32 patches of 14, merged 2 x 2 into 256 image tokens (56: 4 tokens)
IMAGE_SIDE = {"real": 448, "smoke": 56}


def media_batch(config, family, prompts: int, audio_seconds: float, device, image_side: int | None = None) -> dict:
    """Token ids with one audio placeholder block per prompt (the family's count for the clip) and, with
    `image_side`, one image block before it (as avrl's processor orders them), random features and pixels. Omni
    models wrap each block in its start/end tokens: their 3-D rope finds the media by them."""
    window = config.audio_config.max_source_positions * 2  # mel frames in the encoder's window (30 s: 3,000)
    frames = min(int(audio_seconds * 100), window)
    n_audio = int(family.audio_token_count(torch.tensor(frames)))

    def block(token: str, n: int) -> torch.Tensor:
        ids = [getattr(config, f"{token}_token_id")] * n
        start, end = getattr(config, f"{token}_start_token_id", None), getattr(config, f"{token}_end_token_id", None)
        return torch.tensor(([start] if start is not None else []) + ids + ([end] if end is not None else []))

    media = [block("audio", n_audio)]
    batch = {}
    if image_side:
        vision = config.vision_config
        side = image_side // vision.patch_size
        n_image = side * side // vision.spatial_merge_size**2
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        batch["pixel_values"] = torch.randn(prompts * side * side, patch, device=device)
        batch["image_grid_thw"] = torch.tensor([[1, side, side]] * prompts, device=device)
        media.insert(0, torch.tensor([config.vision_start_token_id, *[config.image_token_id] * n_image,
                                      config.vision_end_token_id]))
    text = torch.randint(10, min(1000, config.text_config.vocab_size // 2), (prompts, 40))  # below the special tokens
    ids = torch.cat([text[:, :20], torch.cat(media).expand(prompts, -1), text[:, 20:]], dim=1)
    feature_mask = torch.zeros(prompts, window, dtype=torch.long)
    feature_mask[:, :frames] = 1
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
            "input_features": torch.randn(prompts, config.audio_config.num_mel_bins, window, device=device),
            "feature_attention_mask": feature_mask.to(device), **batch}


def build(config, family, device, dtype, checkpointing: bool):
    """A randomly initialised model of the family at `config`'s sizes, its encoders frozen (as avrl's defaults)."""
    from avrl.models.loading import enable_checkpointing
    from avrl.models.multimodal import audio_encoder, vision_encoder

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in bf16: a 7B model in fp32 would take 34 GB first
    try:
        with torch.device(device):
            model = family.transformers_class()(config)
    finally:
        torch.set_default_dtype(previous)
    for encoder in (audio_encoder(model), vision_encoder(model)):
        if encoder is not None:
            encoder.requires_grad_(False)
    if checkpointing:
        enable_checkpointing(model)
    return model


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def measure_step(model, config, family, batch: dict, *, G: int, length: int, steps: int, shared_prefix: bool,
                 lora: bool) -> dict:
    """Median seconds per phase over the steps after the first (the first warms up), and peak memory."""
    from avrl.algorithms.grpo import grpo_loss
    from avrl.policy import Policy

    device = next(model.parameters()).device
    policy = Policy(model, _Processor(config.text_config.vocab_size), family, shared_prefix=shared_prefix)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    prompts = batch["input_ids"].shape[0]
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
            "prompt_tokens": int(batch["input_ids"].shape[1]), "peak_memory_mb": peak_memory_mb(device)}


def peak_memory_mb(device) -> float:
    """CUDA max allocated on a GPU, else the process's peak RSS (run one measurement per process)."""
    import resource

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_gpu(smoke: bool) -> dict:
    """`python -m benchmarks.speed gpu`: R1-AQA's step at each 7B shape's sizes, shared and repeated prefix, and the
    memory plan of full fine-tuning."""
    if not torch.cuda.is_available() and not smoke:
        raise SystemExit("python -m benchmarks.speed gpu needs a CUDA device (use --smoke to run its code path on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts, G, length, steps = (2, 8, 256, 3) if not smoke else (1, 2, 4, 1)
    result = {"dtype": str(dtype), "device": str(device), "prompts": prompts, "G": G, "completion_tokens": length,
              "audio_seconds": 10.0, "lora_r": LORA["r"], "gradient_checkpointing": True, "steps": steps,
              "paper_gpu_hours": PAPER_GPU_HOURS, "full_fine_tuning": {}}
    for name, (family_name, shape, tiny, with_image) in SHAPES.items():
        image_side = IMAGE_SIDE["smoke" if smoke else "real"] if with_image else None
        row, parameters = measure_shape(family_name, tiny if smoke else shape, image_side, device, dtype,
                                        prompts=prompts, G=G, length=length, steps=steps)
        result[name] = row
        result["full_fine_tuning"][name] = full_fine_tuning_plan(parameters["total"], parameters["largest_layer"])
    return result


def measure_shape(family_name: str, asset: str, image_side: int | None, device, dtype, **step) -> tuple[dict, dict]:
    """LoRA GRPO steps on one shape, shared and repeated prefix; (its row, its parameter counts)."""
    from transformers import AutoConfig

    from avrl.models import families
    from avrl.models.lora import apply_lora

    family = families.get(family_name)
    config = AutoConfig.from_pretrained(ASSETS / asset)
    model = build(config, family, device, dtype, checkpointing=True)
    parameters = {"total": sum(p.numel() for p in model.parameters()),
                  "largest_layer": max(p.numel() for p in model.parameters())}
    model = apply_lora(model, OmegaConf.create(LORA))
    batch = media_batch(config, family, step["prompts"], 10.0, device, image_side=image_side)
    media = "10 s of audio" + (f" and a {image_side} x {image_side} image" if image_side else "")
    row = {"shape": f"avrl/assets/{asset}", "media_per_prompt": media, "parameters": parameters["total"],
           "prompt_tokens": int(batch["input_ids"].shape[1])}
    for shared in (True, False):
        r = measure_step(model, config, family, batch, G=step["G"], length=step["length"], steps=step["steps"],
                         shared_prefix=shared, lora=True)
        r["completion_tokens_per_second"] = step["prompts"] * step["G"] * step["length"] / r["step_seconds"]
        r["gpu_hours_per_1000_steps_on_8_gpus"] = r["step_seconds"] * 1000 * 8 / 3600
        row["shared_prefix" if shared else "repeated_prefix"] = r
        phase = r["seconds_by_phase"]
        print(f"  {asset}, {'shared' if shared else 'repeated'} prefix: {r['step_seconds']:.2f} s/step "
              f"(rollout {phase['rollout']:.2f}, reference {phase['reference_logps']:.2f}, update "
              f"{phase['update']:.2f}); {r['completion_tokens_per_second']:.0f} completion tokens/s; "
              f"~{r['gpu_hours_per_1000_steps_on_8_gpus']:.0f} GPU-hours per 1,000 steps on 8 GPUs "
              f"(paper: {PAPER_GPU_HOURS[0]}-{PAPER_GPU_HOURS[1]}); peak {r['peak_memory_mb'] / 1024:.1f} GiB",
              flush=True)
    del model, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, parameters


ZERO_SETUPS = {  # name -> (stage, optimizer offloaded to CPU, parameters offloaded to CPU)
    "zero2": (2, False, False), "zero2_offload_optimizer": (2, True, False), "zero3": (3, False, False),
    "zero3_offload_optimizer": (3, True, False), "zero3_offload_all": (3, True, True),
}


def full_fine_tuning_plan(parameters: int, largest_layer: int, gpu_bytes: int | None = None,
                          host_bytes: int | None = None) -> dict:
    """Full fine-tuning's model states (weights, gradients, Adam moments, fp32 masters) by ZeRO setup, from
    DeepSpeed's own estimators (default buffer factor 1.5), per GPU and per node's host memory, on 1 GPU and on
    8 GPUs per node; and whether each setup fits this machine's one GPU and host memory (activations not counted:
    a fit here is necessary, not sufficient)."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return {"error": "deepspeed is not installed (pip install --no-build-isolation 'avrl[deepspeed]')"}
    if gpu_bytes is None and torch.cuda.is_available():
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    if host_bytes is None:
        host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gib = 2**30
    plan = {"parameters": parameters, "gpu_gib": gpu_bytes / gib if gpu_bytes else None, "host_gib": host_bytes / gib,
            "setups": {}}
    for name, (stage, offload_optimizer, offload_parameters) in ZERO_SETUPS.items():
        row = {}
        for gpus in (1, 8):
            if stage == 2:
                host, gpu = estimate_zero2_model_states_mem_needs(parameters, gpus, 1, cpu_offload=offload_optimizer)
            else:
                host, gpu, _ = estimate_zero3_model_states_mem_needs(
                    parameters, largest_layer, gpus, 1, cpu_offload=offload_optimizer,
                    cpu_offload_params=offload_parameters)
            row[f"{gpus}_gpu"] = {"gpu_gib": gpu / gib, "host_gib_per_node": host / gib}
        one = row["1_gpu"]
        row["fits_this_machine"] = bool(gpu_bytes) and one["gpu_gib"] * gib <= gpu_bytes and \
            one["host_gib_per_node"] * gib <= host_bytes
        plan["setups"][name] = row
    fits = [name for name, row in plan["setups"].items() if row["fits_this_machine"]]
    plan["verdict"] = ("no GPU on this machine" if not gpu_bytes else
                       f"fits one GPU of this machine with {', '.join(fits)}" if fits else
                       f"fits no ZeRO setup of this machine's one GPU ({plan['gpu_gib']:.0f} GiB) and "
                       f"{plan['host_gib']:.0f} GiB of host memory")
    print(f"  full fine-tuning, {parameters / 1e9:.2f}B parameters: {plan['verdict']}", flush=True)
    for name, row in plan["setups"].items():
        one, eight = row["1_gpu"], row["8_gpu"]
        print(f"    {name:<24} 1 GPU: {one['gpu_gib']:6.1f} GiB GPU + {one['host_gib_per_node']:6.1f} GiB host;  "
              f"8 GPUs: {eight['gpu_gib']:6.1f} GiB per GPU + {eight['host_gib_per_node']:6.1f} GiB host per node",
              flush=True)
    return plan
