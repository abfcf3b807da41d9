"""The GRPO step's speed and memory on CPU sizes: `python -m benchmarks.speed [trl|audio|prefix|scaling|all]
[--smoke] [--out benchmarks/speed.json]`.

- trl: avrl's GRPO step against TRL's GRPOTrainer on the same randomly initialised text-only Qwen2 model, same G,
  prompts per step, completion length, beta, loss type, fp32, no gradient checkpointing; each framework runs in
  its own process so peak memory is its own. Two shapes: short prompts (~20 tokens) and audio-length prompts (512
  tokens, G = 8, 64-token completions); avrl with its shared prefix (the default) and with the repeated path.
  Figures: seconds per optimizer step (median after warm-up) and peak memory (CUDA max allocated on a GPU, else the
  process's peak RSS); ratios avrl / TRL.
- audio: one GRPO loss forward+backward through a trainable Qwen2-Audio encoder (small, 30 s window) with the
  encoder run once per prompt (avrl) versus on G copies of the features (the published trainers).
- prefix: one GRPO step of a Qwen2-Audio model (CPU sizes) on 30 s of audio (790 prompt tokens), G = 8 and 16,
  shared vs repeated prefix, by phase (benchmarks/audio_step.py).
- scaling: step time as the prompt length (128 .. 2048) and G (2 .. 16) grow, both paths, one table.

The 7B models on a GPU: benchmarks/gpu.py. Figures are printed (a summary table at the end) and written as JSON
(docs/measurements.md shows them: `python benchmarks/measurements.py`); nothing here is asserted (the tests run
`--smoke`, one short step of each). Each measurement runs in a fresh process, so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from transformers import (
    AutoTokenizer,
    Qwen2AudioConfig,
    Qwen2AudioEncoder,
    Qwen2AudioEncoderConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from avrl.algorithms.grpo import GRPOModule
from avrl.config import asset_path
from avrl.data.items import QAItem
from avrl.models import families
from avrl.prompts import PromptSpec
from avrl.schemas import AlgorithmConfig, ModelConfig, OptimConfig
from benchmarks.audio_step import (
    FullLengthProcessor,
    build,
    measure_step,
    media_batch,
    peak_memory_mb,
    start_report,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ shared set-up
SIZES = {  # a text-only Qwen2 large enough that compute, not Python, dominates a CPU step
    "full": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2
    ),
    # The scaling grid's: smaller, so that the repeated path at 2,048 prompt tokens and G = 16 fits in minutes.
    "scaling": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    "smoke": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}
AUDIO_ENCODER = {
    "full": dict(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024),
    "smoke": dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128),
}


def _tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tiny_qwen2_audio"))
    tokenizer.padding_side = "left"
    return tokenizer


def text_model(size: str, seed: int = 0):
    tokenizer = _tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float(), tokenizer


# The text-only Qwen2 as a model family for avrl's code paths, handed to GRPOModule (it is in no registry of avrl):
# no chat template, media or special tokens; its forward takes the embeddings.
TEXT_FAMILY = families.Family(
    name="text_qwen2",
    model_class="Qwen2ForCausalLM",
    chat_template="",
    special_tokens=(),
    audio_token="",
    image_token=None,
    audio_token_count=None,
    encode_audio=None,
    checkpoint_renames=(),
    build_tiny=None,
    forward_takes_input_ids=False,
)

PROMPTS = [
    f"Question {i}: is the tone in the audio high or low in pitch? Answer in <answer></answer>." for i in range(256)
]
FILLER = "Listen to the clip: a tone rises, falls, then holds steady while a second voice answers from far away. " * 400


def prompts_of(tokens: int | None) -> list[str]:
    """The benchmark's prompts: the short questions, or questions padded with filler to `tokens` tokens (the length
    of an audio prompt) — the same strings for both frameworks."""
    if not tokens:
        return PROMPTS
    tokenizer = _tokenizer()
    return [tokenizer.decode(tokenizer(f"{p} {FILLER}")["input_ids"][:tokens]) for p in PROMPTS]


def text_reward(texts: list[str]) -> list[float]:
    """The same cheap, varied reward for both frameworks (a spread within each group, so the loss is not zero)."""
    return [float(sum(map(ord, t)) % 7) / 6 for t in texts]


def step_timer():
    """A Lightning callback recording the wall time of every training batch."""

    class Timer(Callback):
        times: list[float] = []

        def on_train_batch_start(self, *args):
            self._start = time.perf_counter()

        def on_train_batch_end(self, *args):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    return Timer()


# ------------------------------------------------------------------------------------------------ avrl, text
def run_avrl(
    size: str,
    prompts: int,
    G: int,
    length: int,
    steps: int,
    beta: float,
    loss_type: str,
    prompt_tokens: int | None = None,
    shared_prefix: bool = True,
) -> dict:
    """avrl's GRPO step as a user trains it (GRPOModule under a Lightning Trainer) on the text-only Qwen2. The
    completions always have the full length (a stop token the model cannot emit; TRL gets min_new_tokens)."""
    model, tokenizer = text_model(size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The configs as a run composes them (avrl's schemas hold every default), with the settings TRL gets too.
    algo = OmegaConf.merge(
        OmegaConf.structured(AlgorithmConfig),
        dict(
            name="grpo",
            _target_="avrl.algorithms.grpo.GRPOModule",
            num_generations=G,
            temperature=1.0,
            top_p=1.0,
            max_completion_length=length,
            beta=beta,
            epsilon=0.2,
            epsilon_high=None,
            num_iterations=1,
            loss_type=loss_type,
            scale_rewards="group",
            mask_truncated_completions=False,
            micro_batch_prompts=None,
            validate_at_start=False,
            shared_prefix=shared_prefix,
            log_completions_rows=0,
            sampling_seed=0,
            lora=None,
        ),
    )
    optim = OmegaConf.merge(
        OmegaConf.structured(OptimConfig),
        dict(lr=1e-6, weight_decay=0.0, betas=[0.9, 0.999], scheduler="constant", warmup_ratio=0.0, max_grad_norm=1.0),
    )
    # The model, its family and its reference are handed in: model_cfg names them only for the run's records.
    model_cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        dict(name=TEXT_FAMILY.name, family=TEXT_FAMILY.name, name_or_path=f"random text-only Qwen2 ({size})"),
    )
    reference = text_model(size)[0].eval().requires_grad_(False) if beta else None  # the same initial weights
    module = GRPOModule(
        model_cfg=model_cfg,
        algorithm=algo,
        optim=optim,
        processor=FullLengthProcessor(len(tokenizer), tokenizer),
        prompt=PromptSpec(name="bench", template="{question}"),
        reward_functions={"r": lambda texts, items, p: text_reward(texts)},
        reward_weights={"r": 1.0},
        model=model,
        family=TEXT_FAMILY,
        ref_model=reference,
    )

    def collate(texts):
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        items = [QAItem(id=t.split(":")[0], question=t, choices=["a", "b"], answer_index=0) for t in texts]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "items": items}

    loader = DataLoader(prompts_of(prompt_tokens) * 4, batch_size=prompts, collate_fn=collate, shuffle=False)
    timer = step_timer()
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
        precision="32-true",
    )
    trainer.fit(module, train_dataloaders=loader)
    return {
        "step_seconds": timer.times,
        "peak_memory_mb": peak_memory_mb(),
        "mean_completion_length": float(trainer.callback_metrics["train/completions/mean_length"]),
        "prompt_tokens": len(tokenizer(prompts_of(prompt_tokens)[0])["input_ids"]),
    }


# ------------------------------------------------------------------------------------------------ TRL, text
def run_trl(
    size: str,
    prompts: int,
    G: int,
    length: int,
    steps: int,
    beta: float,
    loss_type: str,
    prompt_tokens: int | None = None,
) -> dict:
    from datasets import Dataset  # the bench extra (trl, which brings datasets): only this job needs them
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = text_model(size)
    times, lengths = [], []
    saved = tempfile.mkdtemp()  # TRL builds its reference model from the policy's checkpoint folder
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    model = Qwen2ForCausalLM.from_pretrained(saved, dtype=torch.float32)

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def reward(prompts, completions, **kwargs):
        return text_reward(completions)

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=prompts * G,
            num_generations=G,
            max_completion_length=length,
            beta=beta,
            loss_type=loss_type,
            learning_rate=1e-6,
            max_steps=steps,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=not torch.cuda.is_available(),
            temperature=1.0,
            top_p=1.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            dataloader_num_workers=0,
            seed=0,
            generation_kwargs={"min_new_tokens": length},
        )
        dataset = Dataset.from_dict({"prompt": prompts_of(prompt_tokens) * 4})
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            processing_class=tokenizer,
            train_dataset=dataset,
            callbacks=[Timer()],
        )
        trainer.train()
    return {
        "step_seconds": times,
        "peak_memory_mb": peak_memory_mb(),
        "mean_completion_length": lengths[-1] if lengths else None,
    }


# ------------------------------------------------------------------------------------------------ audio
def run_audio(seconds: float, G: int, prompts: int, smoke: bool) -> dict:
    """Loss forward+backward of a trainable Qwen2-Audio encoder: once per prompt vs on G copies."""
    torch.manual_seed(0)
    size = AUDIO_ENCODER["smoke" if smoke else "full"]
    encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(num_mel_bins=128, max_source_positions=1500, **size))
    frames = 3000  # Whisper's 30 s window at 100 frames/s; the clip's own length sets the valid frames
    features = torch.randn(prompts, 128, frames)
    valid = int(seconds * 100)
    features[:, :, valid:] = 0
    results = {}
    for name, copies in (("once_per_prompt", 1), ("repeated_G_times", G)):
        x = features.repeat_interleave(copies, dim=0)
        times = []
        for _ in range(1 if smoke else 3):
            start = time.perf_counter()
            hidden = encoder(x).last_hidden_state
            # G completions share one encoding: the once-per-prompt path repeats the outputs, not the inputs.
            out = hidden.repeat_interleave(G // copies, dim=0) if copies == 1 else hidden
            out.float().pow(2).mean().backward()
            times.append(time.perf_counter() - start)
            encoder.zero_grad()
        results[name] = {"seconds": statistics.median(times), "peak_memory_mb": peak_memory_mb()}
    return results


# ------------------------------------------------------------------------------------------------ driver
def _child(kind: str, params: dict) -> dict:
    """Run one measurement in a fresh process (its peak memory is its own)."""
    cmd = [sys.executable, "-m", "benchmarks.speed", "_child", kind, json.dumps(params)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {kind} {params} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_after_warmup(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:] if len(times) > warmup else times)


def bench_trl(smoke: bool) -> dict:
    """avrl (shared prefix, and the repeated path) against TRL on short and on audio-length prompts."""
    shapes = {
        "short_prompts": dict(prompts=4, G=8, length=32, steps=7, prompt_tokens=None),
        "audio_length_prompts": dict(prompts=2, G=8, length=64, steps=4, prompt_tokens=512),
    }
    if smoke:
        shapes = {
            name: dict(prompts=2, G=2, length=4, steps=1, prompt_tokens=s["prompt_tokens"] and 32)
            for name, s in shapes.items()
        }
    result = {}
    for name, shape in shapes.items():
        params = dict(size="smoke" if smoke else "full", beta=0.04, loss_type="dapo", **shape)
        warmup = 0 if smoke else (2 if shape["steps"] > 4 else 1)
        row = {"settings": params, "warmup_steps": warmup}
        for label, kind, extra in (
            ("avrl", "avrl", {}),
            ("avrl_repeated_prefix", "avrl", {"shared_prefix": False}),
            ("trl", "trl", {}),
        ):
            r = _child(kind, {**params, **extra})
            r["median_step_seconds"] = _median_after_warmup(r["step_seconds"], warmup)
            row[label] = r
            print(
                f"  {name}: {label:20s} {r['median_step_seconds']:.3f} s/step, peak {r['peak_memory_mb']:.0f} MB, "
                f"completion length {r['mean_completion_length']}",
                flush=True,
            )
        for label in ("avrl", "avrl_repeated_prefix"):
            row[f"time_ratio_{label}_over_trl"] = row[label]["median_step_seconds"] / row["trl"]["median_step_seconds"]
            row[f"memory_ratio_{label}_over_trl"] = row[label]["peak_memory_mb"] / row["trl"]["peak_memory_mb"]
        print(
            f"  {name}: avrl/TRL time {row['time_ratio_avrl_over_trl']:.2f}, memory "
            f"{row['memory_ratio_avrl_over_trl']:.2f} (repeated prefix: "
            f"{row['time_ratio_avrl_repeated_prefix_over_trl']:.2f}, "
            f"{row['memory_ratio_avrl_repeated_prefix_over_trl']:.2f})",
            flush=True,
        )
        result[name] = row
    return result


def bench_audio(smoke: bool) -> dict:
    rows = []
    for seconds in (10,) if smoke else (10, 30):
        for G in (2,) if smoke else (8, 16):
            r = _child("audio", dict(seconds=seconds, G=G, prompts=1, smoke=smoke))
            rows.append({"audio_seconds": seconds, "G": G, **r})
            print(
                f"  {seconds:>2} s, G={G:<2}: once per prompt {r['once_per_prompt']['seconds']:.3f} s "
                f"({r['once_per_prompt']['peak_memory_mb']:.0f} MB) vs repeated "
                f"{r['repeated_G_times']['seconds']:.3f} s "
                f"({r['repeated_G_times']['peak_memory_mb']:.0f} MB)",
                flush=True,
            )
    return {"rows": rows, "note": "peak memory is the process peak after both variants on CPU (RSS)"}


def run_audio_step(size: str, seconds: float, G: int, length: int, steps: int, shared_prefix: bool) -> dict:
    """One GRPO step of a randomly initialised Qwen2-Audio (the text model's sizes, a small encoder, frozen)."""
    tiny = Qwen2AudioConfig.from_pretrained(asset_path("tiny_qwen2_audio"))
    config = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=128, max_source_positions=1500, **AUDIO_ENCODER[size]),  # a 30 s window
        text_config=dict(
            model_type="qwen2",
            vocab_size=tiny.text_config.vocab_size,
            max_position_embeddings=4096,
            **SIZES["smoke" if size == "smoke" else "full"],
        ),
        audio_token_id=tiny.audio_token_id,
    )
    torch.manual_seed(0)
    family, device = families.get("qwen2_audio"), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(config, family, device, torch.float32, checkpointing=False)
    return measure_step(
        model,
        config,
        family,
        media_batch(config, family, 1, seconds, device),
        G=G,
        length=length,
        steps=steps,
        shared_prefix=shared_prefix,
        lora=False,
    )


def bench_prefix(smoke: bool) -> dict:
    """The audio model on 30 s of audio: shared vs repeated prefix, step time by phase and peak memory."""
    rows = []
    for G in (2,) if smoke else (8, 16):
        row = {"audio_seconds": 30, "G": G, "completion_tokens": 4 if smoke else 64}
        for shared in (True, False):
            r = _child(
                "audio_step",
                dict(
                    size="smoke" if smoke else "full",
                    seconds=30,
                    G=G,
                    length=row["completion_tokens"],
                    steps=1 if smoke else 2,
                    shared_prefix=shared,
                ),
            )
            row["shared_prefix" if shared else "repeated_prefix"] = r
        row["prompt_tokens"] = row["shared_prefix"]["prompt_tokens"]
        row["time_ratio_shared_over_repeated"] = (
            row["shared_prefix"]["step_seconds"] / row["repeated_prefix"]["step_seconds"]
        )
        row["memory_ratio_shared_over_repeated"] = (
            row["shared_prefix"]["peak_memory_mb"] / row["repeated_prefix"]["peak_memory_mb"]
        )
        print(
            f"  30 s audio ({row['prompt_tokens']} prompt tokens), G={G:<2}: shared "
            f"{row['shared_prefix']['step_seconds']:.2f} s ({row['shared_prefix']['peak_memory_mb']:.0f} MB) vs "
            f"repeated {row['repeated_prefix']['step_seconds']:.2f} s "
            f"({row['repeated_prefix']['peak_memory_mb']:.0f} MB): time "
            f"x{row['time_ratio_shared_over_repeated']:.2f}, memory x{row['memory_ratio_shared_over_repeated']:.2f}",
            flush=True,
        )
        rows.append(row)
    return {
        "rows": rows,
        "model": "Qwen2-Audio, text model = the trl section's, encoder d_model 256 x 4 layers",
        "note": "the encoder is frozen and runs once per prompt on both paths; only the LM's prefix differs",
    }


def bench_scaling(smoke: bool) -> dict:
    """A GRPOModule step (1 prompt, 16-token completions) over prompt length x G, shared and repeated prefix."""
    rows = []
    lengths, groups = ((32,), (2,)) if smoke else ((128, 512, 2048), (2, 4, 8, 16))
    for prompt_tokens in lengths:
        for G in groups:
            row = {"prompt_tokens": prompt_tokens, "G": G}
            for shared in (True, False):
                params = dict(
                    size="smoke" if smoke else "scaling",
                    prompts=1,
                    G=G,
                    length=4 if smoke else 16,
                    steps=1 if smoke else 2,
                    beta=0.04,
                    loss_type="dapo",
                    prompt_tokens=prompt_tokens,
                    shared_prefix=shared,
                )
                r = _child("avrl", params)
                row["shared" if shared else "repeated"] = {
                    "median_step_seconds": _median_after_warmup(r["step_seconds"], 0 if smoke else 1),
                    "peak_memory_mb": r["peak_memory_mb"],
                }
            row["time_ratio_shared_over_repeated"] = (
                row["shared"]["median_step_seconds"] / row["repeated"]["median_step_seconds"]
            )
            print(
                f"  prompt {prompt_tokens:>4} tokens, G={G:<2}: shared {row['shared']['median_step_seconds']:.2f} s"
                f", repeated {row['repeated']['median_step_seconds']:.2f} s "
                f"(x{row['time_ratio_shared_over_repeated']:.2f})",
                flush=True,
            )
            rows.append(row)
    return {
        "prompts": 1,
        "completion_tokens": 4 if smoke else 16,
        "rows": rows,
        "model": "smoke" if smoke else f"text-only Qwen2 {SIZES['scaling']}; median of the steps after the first",
    }


def summary(report: dict) -> str:
    """The headline ratios as one table."""
    lines = ["| comparison | time ratio | memory ratio |", "|---|---|---|"]
    for name, row in report.get("trl", {}).items():
        lines.append(
            f"| avrl / TRL, {name.replace('_', ' ')} | {row['time_ratio_avrl_over_trl']:.2f} | "
            f"{row['memory_ratio_avrl_over_trl']:.2f} |"
        )
        lines.append(
            f"| avrl repeated prefix / TRL, {name.replace('_', ' ')} | "
            f"{row['time_ratio_avrl_repeated_prefix_over_trl']:.2f} | "
            f"{row['memory_ratio_avrl_repeated_prefix_over_trl']:.2f} |"
        )
    for row in report.get("prefix", {}).get("rows", []):
        lines.append(
            f"| shared / repeated prefix, audio model, {row['audio_seconds']} s audio, G={row['G']} | "
            f"{row['time_ratio_shared_over_repeated']:.2f} | {row['memory_ratio_shared_over_repeated']:.2f} |"
        )
    for row in report.get("scaling", {}).get("rows", []):
        memory = row["shared"]["peak_memory_mb"] / row["repeated"]["peak_memory_mb"]
        lines.append(
            f"| shared / repeated prefix, text model, {row['prompt_tokens']}-token prompt, G={row['G']} | "
            f"{row['time_ratio_shared_over_repeated']:.2f} | {memory:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        kind, params = argv[1], json.loads(argv[2])
        fn = {"avrl": run_avrl, "trl": run_trl, "audio": run_audio, "audio_step": run_audio_step}[kind]
        print(json.dumps(fn(**params)))
        return {}
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="?", default="all", choices=["all", "trl", "audio", "prefix", "scaling"])
    parser.add_argument("--smoke", action="store_true", help="one short step of each, tiny sizes (CI)")
    parser.add_argument(
        "--out", help="where the figures are written (JSON); default benchmarks/speed.json, and nowhere with --smoke"
    )
    args = parser.parse_args(argv)
    out = args.out or (None if args.smoke else str(Path(__file__).with_suffix(".json")))
    report = start_report(" ".join(["python -m benchmarks.speed", *argv]), args.smoke)
    for name, fn in (("trl", bench_trl), ("audio", bench_audio), ("prefix", bench_prefix), ("scaling", bench_scaling)):
        if args.which in ("all", name):
            print(f"{name}:", flush=True)
            report[name] = fn(args.smoke)
    report["summary"] = summary(report)
    print(report["summary"])
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
