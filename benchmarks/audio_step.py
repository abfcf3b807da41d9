"""One GRPO step of an audio model, timed by phase (rollout / reference log-probs / update) as GRPOModule runs it,
on a randomly initialised model and a batch built directly; shared by `python -m benchmarks.speed prefix` (CPU
sizes, 30 s of audio) and `python -m benchmarks.gpu` (the 7B models' real sizes). Also what every benchmark
reports with its figures: the machine and the peak memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import time
import warnings
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import torch

from avrl.algorithms.grpo import grpo_loss
from avrl.console import LIBRARY_WARNINGS
from avrl.models.loading import enable_checkpointing
from avrl.models.multimodal import audio_encoder, vision_encoder
from avrl.policy import Policy


class FullLengthProcessor:
    """The little of avrl's AudioTextProcessor that Policy and GRPOModule use: a stop token the model cannot emit
    (every completion has the full length, so the figures are stable) and decoding, by `tokenizer` when given (the
    text rewards read the completions) or to empty strings (a batch built directly needs no text)."""

    def __init__(self, vocab_size: int, tokenizer=None):
        self.stop_token_ids = [vocab_size + 1]
        self.tokenizer = tokenizer if tokenizer is not None else SimpleNamespace(pad_token_id=0)

    def decode(self, ids):
        if hasattr(self.tokenizer, "batch_decode"):
            return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [""] * len(ids)


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
        media.insert(
            0,
            torch.tensor(
                [config.vision_start_token_id, *[config.image_token_id] * n_image, config.vision_end_token_id]
            ),
        )
    text = torch.randint(10, min(1000, config.text_config.vocab_size // 2), (prompts, 40))  # below the special tokens
    ids = torch.cat([text[:, :20], torch.cat(media).expand(prompts, -1), text[:, 20:]], dim=1)
    feature_mask = torch.zeros(prompts, window, dtype=torch.long)
    feature_mask[:, :frames] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids, device=device),
        "input_features": torch.randn(prompts, config.audio_config.num_mel_bins, window, device=device),
        "feature_attention_mask": feature_mask.to(device),
        **batch,
    }


def build(config, family, device, dtype, checkpointing: bool):
    """A randomly initialised model of the family at `config`'s sizes, its encoders frozen (as avrl's defaults)."""
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


def measure_step(
    model, config, family, batch: dict, *, G: int, length: int, steps: int, shared_prefix: bool, lora: bool
) -> dict:
    """Median seconds per phase over the steps after the first (the first warms up), and peak memory."""
    device = next(model.parameters()).device
    policy = Policy(model, FullLengthProcessor(config.text_config.vocab_size), family, shared_prefix=shared_prefix)
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
            with torch.no_grad(), model.disable_adapter() if lora else contextlib.nullcontext():
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
    return {
        "seconds_by_phase": median,
        "step_seconds": sum(median.values()),
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "peak_memory_mb": peak_memory_mb(device),
    }


def peak_memory_mb(device: torch.device | None = None) -> float:
    """CUDA max allocated on a GPU, else the process's peak RSS (run one measurement per process)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """The machine and the versions the figures were measured with."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    for package in ("transformers", "lightning", "trl", "deepspeed"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def start_report(command: str, smoke: bool) -> dict:
    """What every benchmark does before it measures: the libraries' notices about their own internals dropped (as
    run.py drops them) and every core used; the report's header (machine, smoke, date, command)."""
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    torch.set_num_threads(os.cpu_count() or 1)
    return {"machine": machine(), "smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M"), "command": command}


def write_report(report: dict, out: str | None) -> None:
    """The figures as JSON at `out` (nowhere when None: a smoke run without --out)."""
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {out}")
