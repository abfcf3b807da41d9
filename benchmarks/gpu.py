"""R1-AQA's GRPO step on the 7B models' real sizes, on a CUDA device: `python -m benchmarks.gpu [--smoke] [--out
benchmarks/gpu.json]` (on an offline GPU machine: `bash benchmarks/gpu_checks.sh run bench`).

R1-AQA's per-device batch with random bf16 weights, gradient checkpointing and LoRA adapters, on two shapes:
Qwen2-Audio-7B-Instruct (avrl/assets/shapes/qwen2_audio_7b; 10 s of audio per prompt) and the Qwen2.5-Omni-7B
thinker (avrl/assets/shapes/qwen2_5_omni_7b_thinker; 10 s of audio and a 448 x 448 image per prompt, as EchoInk-R1's
audio-visual questions). 2 prompts x G = 8 completions, 256 completion tokens (the stop token is one the model
cannot emit, so every completion has the full length and the figure is stable). Reported: seconds per step by phase
(at num_iterations 1 avrl computes no separate old log-probs, so neither does this step; benchmarks/audio_step.py),
peak GPU memory, completion tokens per second, and GPU-hours per 1,000 steps on 8 GPUs (each GPU runs its own
per-device batch; communication not counted) next to 32-40 GPU-hours ("4-5 h on 8 H800", an unsourced figure: see
PAPER_GPU_HOURS), for the
shared-prefix and the repeated path. Full fine-tuning: DeepSpeed's own estimate of the model states' memory for
ZeRO-2/3 with and without offload, on 1 GPU and on 8 GPUs per node, against this machine's GPU and host memory
(the 8.4B model fits no ZeRO configuration of one 141 GB GPU with 128 GiB of host memory). `--smoke` runs the
same code on the tiny models' sizes (on CPU when there is no GPU): the tests check that the code path works; its
timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig

from avrl.config import ASSETS
from avrl.models import families
from avrl.models.lora import apply_lora
from benchmarks.audio_step import build, measure_step, media_batch, start_report, write_report

# "4-5 h on 8 H800" for R1-AQA's 1,000 steps: NOT in xiaomi-research/r1-aqa. No version of its README (git log -S
# H800: none) nor its code states a training time or GPU type; README.md:103 only recommends "a GPU with 80 GB
# of memory". An unverified scale for comparison, not the paper's measurement.
PAPER_GPU_HOURS = (32, 40)
LORA = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "include_audio_encoder": False,
}


# name -> (family, the real sizes, the tiny sizes for --smoke, an image with each prompt's audio)
SHAPES = {
    "qwen2_audio_7b": ("qwen2_audio", "shapes/qwen2_audio_7b", "tiny_qwen2_audio", False),
    "qwen2_5_omni_7b_thinker": ("qwen2_5_omni", "shapes/qwen2_5_omni_7b_thinker", "tiny_qwen2_5_omni", True),
}
# pixels: 448 is 32 x 32 patches of 14, merged 2 x 2 into 256 image tokens (56: 4 tokens)
IMAGE_SIDE = {"real": 448, "smoke": 56}


def run(smoke: bool) -> dict:
    """R1-AQA's step at each 7B shape's sizes, shared and repeated prefix, and the memory plan of full
    fine-tuning."""
    if not torch.cuda.is_available() and not smoke:
        raise SystemExit("python -m benchmarks.gpu needs a CUDA device (use --smoke to run its code path on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts, G, length, steps = (2, 8, 256, 3) if not smoke else (1, 2, 4, 1)
    result = {
        "dtype": str(dtype),
        "device": str(device),
        "prompts": prompts,
        "G": G,
        "completion_tokens": length,
        "audio_seconds": 10.0,
        "lora_r": LORA["r"],
        "gradient_checkpointing": True,
        "steps": steps,
        "paper_gpu_hours": PAPER_GPU_HOURS,
        "full_fine_tuning": {},
    }
    for name, (family_name, shape, tiny, with_image) in SHAPES.items():
        image_side = IMAGE_SIDE["smoke" if smoke else "real"] if with_image else None
        row, parameters = measure_shape(
            family_name,
            tiny if smoke else shape,
            image_side,
            device,
            dtype,
            prompts=prompts,
            G=G,
            length=length,
            steps=steps,
        )
        result[name] = row
        result["full_fine_tuning"][name] = full_fine_tuning_plan(parameters["total"], parameters["largest_layer"])
    return result


def measure_shape(family_name: str, asset: str, image_side: int | None, device, dtype, **step) -> tuple[dict, dict]:
    """LoRA GRPO steps on one shape, shared and repeated prefix; (its row, its parameter counts)."""
    family = families.get(family_name)
    config = AutoConfig.from_pretrained(ASSETS / asset)
    model = build(config, family, device, dtype, checkpointing=True)
    parameters = {
        "total": sum(p.numel() for p in model.parameters()),
        "largest_layer": max(p.numel() for p in model.parameters()),
    }
    model = apply_lora(model, OmegaConf.create(LORA))
    batch = media_batch(config, family, step["prompts"], 10.0, device, image_side=image_side)
    media = "10 s of audio" + (f" and a {image_side} x {image_side} image" if image_side else "")
    row = {
        "shape": f"avrl/assets/{asset}",
        "media_per_prompt": media,
        "parameters": parameters["total"],
        "prompt_tokens": int(batch["input_ids"].shape[1]),
    }
    for shared in (True, False):
        r = measure_step(
            model,
            config,
            family,
            batch,
            G=step["G"],
            length=step["length"],
            steps=step["steps"],
            shared_prefix=shared,
            lora=True,
        )
        r["completion_tokens_per_second"] = step["prompts"] * step["G"] * step["length"] / r["step_seconds"]
        r["gpu_hours_per_1000_steps_on_8_gpus"] = r["step_seconds"] * 1000 * 8 / 3600
        row["shared_prefix" if shared else "repeated_prefix"] = r
        phase = r["seconds_by_phase"]
        print(
            f"  {asset}, {'shared' if shared else 'repeated'} prefix: {r['step_seconds']:.2f} s/step "
            f"(rollout {phase['rollout']:.2f}, reference {phase['reference_logps']:.2f}, update "
            f"{phase['update']:.2f}); {r['completion_tokens_per_second']:.0f} completion tokens/s; "
            f"~{r['gpu_hours_per_1000_steps_on_8_gpus']:.0f} GPU-hours per 1,000 steps on 8 GPUs "
            f"(paper: {PAPER_GPU_HOURS[0]}-{PAPER_GPU_HOURS[1]}); peak {r['peak_memory_mb'] / 1024:.1f} GiB",
            flush=True,
        )
    del model, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, parameters


ZERO_SETUPS = {  # name -> (stage, optimizer offloaded to CPU, parameters offloaded to CPU)
    "zero2": (2, False, False),
    "zero2_offload_optimizer": (2, True, False),
    "zero3": (3, False, False),
    "zero3_offload_optimizer": (3, True, False),
    "zero3_offload_all": (3, True, True),
}


def full_fine_tuning_plan(
    parameters: int, largest_layer: int, gpu_bytes: int | None = None, host_bytes: int | None = None
) -> dict:
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
    plan = {
        "parameters": parameters,
        "gpu_gib": gpu_bytes / gib if gpu_bytes else None,
        "host_gib": host_bytes / gib,
        "setups": {},
    }
    for name, (stage, offload_optimizer, offload_parameters) in ZERO_SETUPS.items():
        row = {}
        for gpus in (1, 8):
            if stage == 2:
                host, gpu = estimate_zero2_model_states_mem_needs(parameters, gpus, 1, cpu_offload=offload_optimizer)
            else:
                host, gpu, _ = estimate_zero3_model_states_mem_needs(
                    parameters,
                    largest_layer,
                    gpus,
                    1,
                    cpu_offload=offload_optimizer,
                    cpu_offload_params=offload_parameters,
                )
            row[f"{gpus}_gpu"] = {"gpu_gib": gpu / gib, "host_gib_per_node": host / gib}
        one = row["1_gpu"]
        row["fits_this_machine"] = (
            bool(gpu_bytes) and one["gpu_gib"] * gib <= gpu_bytes and one["host_gib_per_node"] * gib <= host_bytes
        )
        plan["setups"][name] = row
    fits = [name for name, row in plan["setups"].items() if row["fits_this_machine"]]
    plan["verdict"] = (
        "no GPU on this machine"
        if not gpu_bytes
        else f"fits one GPU of this machine with {', '.join(fits)}"
        if fits
        else f"fits no ZeRO setup of this machine's one GPU ({plan['gpu_gib']:.0f} GiB) and "
        f"{plan['host_gib']:.0f} GiB of host memory"
    )
    print(f"  full fine-tuning, {parameters / 1e9:.2f}B parameters: {plan['verdict']}", flush=True)
    for name, row in plan["setups"].items():
        one, eight = row["1_gpu"], row["8_gpu"]
        print(
            f"    {name:<24} 1 GPU: {one['gpu_gib']:6.1f} GiB GPU + {one['host_gib_per_node']:6.1f} GiB host;  "
            f"8 GPUs: {eight['gpu_gib']:6.1f} GiB per GPU + {eight['host_gib_per_node']:6.1f} GiB host per node",
            flush=True,
        )
    return plan


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the same code on the tiny models' sizes (CI, CPU)")
    parser.add_argument(
        "--out", help="where the figures are written (JSON); default benchmarks/gpu.json, and nowhere with --smoke"
    )
    args = parser.parse_args(argv)
    out = args.out or (None if args.smoke else str(Path(__file__).with_suffix(".json")))
    report = {**start_report(" ".join(["python -m benchmarks.gpu", *argv]), args.smoke), **run(args.smoke)}
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
