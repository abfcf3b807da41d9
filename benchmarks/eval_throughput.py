"""task=eval's throughput by batch size, and its peak memory by clip length: `python -m benchmarks.eval_throughput
[--batch-sizes 1 4 8 16] [--items 64] [--max-new-tokens 32] [--model tiny_qwen2_audio] [--clip-seconds 30 120 600]
[--memory-model tiny_qwen2_5_omni] [--smoke] [--out benchmarks/eval_throughput.json]`.

Throughput: the scoring loop of task=eval (avrl/evaluation.py `evaluate_one`: the test loader, greedy
`score_batch`, the prediction records) on the embedded synthetic data, the model loaded once; for each
`data.eval_batch_size` one untimed warm-up batch, then the whole split timed. Figures: items per second and
generated tokens per second (the completions' tokens, decoded and counted again).

Memory: one item whose clip lasts each of `--clip-seconds` (a 440 Hz tone written as a WAV), collated and scored as
task=eval does it, with `data.max_audio_seconds` at the clip's length, on an Omni tiny model (whose encoder takes the
whole clip: docs/models.md), each length in a fresh process: its peak RSS (ru_maxrss) after loading the model and
at the end, and CUDA's max allocated memory during the item when a GPU is there (the model and batch moved to it).

Nothing is asserted; the figures go to the JSON file (docs/measurements.md: `python benchmarks/measurements.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir

from avrl.config import CONF, register_resolvers
from avrl.data.items import QAItem
from avrl.datamodule import AudioQADataModule
from avrl.evaluation import load_for_eval
from avrl.models import load_processor
from avrl.prompts import prompt_spec
from avrl.scoring import prediction_record, score_batch

HERE = Path(__file__).resolve().parent


def config(model: str, items: int, batch: int, max_new_tokens: int, *extra: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "task=eval",
                f"model={model}",
                f"data.test_size={items}",
                f"data.eval_batch_size={batch}",
                f"eval.max_new_tokens={max_new_tokens}",
                "logger=none",
                "output_dir=/tmp/avrl-eval-throughput",
                *extra,
            ],
        )


def measure(policy, processor, cfg) -> dict:
    prompt = prompt_spec(cfg)
    settings = {k: cfg.eval[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k")}
    datamodule = AudioQADataModule(cfg.data, processor, prompt, splits=("test",), shuffle_seed=cfg.seed)
    datamodule.setup()
    loader = datamodule.test_dataloader()
    with torch.no_grad():
        score_batch(policy, next(iter(loader)), prompt, settings)  # warm-up, untimed
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, rows, tokens = time.perf_counter(), 0, 0
        for batch in loader:
            results = score_batch(policy, batch, prompt, settings)
            rows += len([prediction_record(i, r, 1) for i, r in zip(batch["items"], results)])
            tokens += sum(len(processor.tokenizer(r["completion"]).input_ids) for r in results)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"items": rows, "seconds": seconds, "items_per_s": rows / seconds, "tokens_per_s": tokens / seconds}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one_clip(model: str, seconds: float, max_new_tokens: int) -> dict:
    """One item with a clip of `seconds`, scored as task=eval scores it (this process's peak memory is the figure:
    run it in a fresh process)."""
    register_resolvers()
    torch.manual_seed(0)
    cfg = config(model, 1, 1, max_new_tokens, f"data.max_audio_seconds={seconds}")
    processor = load_processor(cfg.model)
    policy = load_for_eval(cfg, processor)
    cuda = torch.cuda.is_available()
    if cuda:
        policy.model.cuda()
    loaded_mb = peak_rss_mb()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.wav"
        t = np.arange(int(seconds * processor.sampling_rate)) / processor.sampling_rate
        sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), processor.sampling_rate)
        item = QAItem("clip", "What is the pitch of the tone?", ["low", "high"], 1, audio=str(path), source="bench")
        prompt = prompt_spec(cfg)
        collate = AudioQADataModule(cfg.data, processor, prompt, splits=()).collate
        collate.for_eval = True  # task=eval renders the prompt's eval_template
        settings = {k: cfg.eval[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k")}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        batch = collate([item])
        if cuda:
            batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            score_batch(policy, batch, prompt, settings)
        seconds_taken = time.perf_counter() - start
    return {
        "clip_seconds": seconds,
        "audio_tokens": int((batch["input_ids"] == processor.audio_token_id).sum()),
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "seconds": seconds_taken,
        "rss_after_load_mb": loaded_mb,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def memory_rows(model: str, clip_seconds: list[float], max_new_tokens: int) -> list[dict]:
    """one_clip for each length, each in a fresh process (a process's peak RSS never goes down)."""
    rows = []
    for seconds in clip_seconds:
        command = [sys.executable, "-m", "benchmarks.eval_throughput", "--one-clip", str(seconds)]
        command += ["--memory-model", model, "--max-new-tokens", str(max_new_tokens)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        cuda = f", CUDA max allocated {row['cuda_max_allocated_mb']:.0f} MB" if row["cuda_max_allocated_mb"] else ""
        print(f"clip {seconds:>5g} s: {row['audio_tokens']} audio tokens, peak RSS {row['peak_rss_mb']:.0f} MB "
              f"({row['rss_after_load_mb']:.0f} MB after loading){cuda}, {row['seconds']:.1f} s")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default="tiny_qwen2_audio")
    parser.add_argument("--clip-seconds", type=float, nargs="+", default=[30, 120, 600])
    parser.add_argument("--memory-model", default="tiny_qwen2_5_omni")
    parser.add_argument("--one-clip", type=float, help="(internal) one item's memory, printed as JSON")
    parser.add_argument("--note", help="what else ran on the machine, written with the figures (e.g. its load)")
    parser.add_argument("--smoke", action="store_true", help="2 batch sizes, 4 items, 4 tokens: the code path only")
    parser.add_argument("--out", type=Path, default=HERE / "eval_throughput.json")
    args = parser.parse_args()
    if args.one_clip is not None:
        print(json.dumps(one_clip(args.memory_model, args.one_clip, args.max_new_tokens)))
        return
    if args.smoke:
        args.batch_sizes, args.items, args.max_new_tokens, args.clip_seconds = [1, 2], 4, 4, [3]
    register_resolvers()
    torch.manual_seed(0)
    first = config(args.model, args.items, args.batch_sizes[0], args.max_new_tokens)
    processor = load_processor(first.model)
    policy = load_for_eval(first, processor)
    rows = []
    for batch in args.batch_sizes:
        result = {
            "batch_size": batch,
            **measure(policy, processor, config(args.model, args.items, batch, args.max_new_tokens)),
        }
        rows.append(result)
        print(f"batch {batch:>3}: {result['items_per_s']:8.2f} items/s  {result['tokens_per_s']:9.1f} tokens/s  "
              f"({result['items']} items in {result['seconds']:.2f} s)")  # fmt: skip
    memory = memory_rows(args.memory_model, args.clip_seconds, args.max_new_tokens)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.eval_throughput " + " ".join(sys.argv[1:]),
        "machine": {
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "note": args.note,
        "commit": commit.strip(),
        "model": args.model,
        "items": args.items,
        "max_new_tokens": args.max_new_tokens,
        "smoke": args.smoke,
        "rows": rows,
        "memory_model": args.memory_model,
        "memory": memory,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
