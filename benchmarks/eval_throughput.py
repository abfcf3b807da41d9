"""task=eval's throughput by batch size: `python -m benchmarks.eval_throughput [--batch-sizes 1 4 8 16]
[--items 64] [--max-new-tokens 32] [--model tiny_qwen2_audio] [--smoke] [--out benchmarks/eval_throughput.json]`.

The scoring loop of task=eval (avrl/evaluation.py `evaluate_one`: the test loader, greedy `score_batch`, the
prediction records) on the embedded synthetic data, the model loaded once; for each `data.eval_batch_size` one
untimed warm-up batch, then the whole split timed. Figures: items per second and generated tokens per second (the
completions' tokens, decoded and counted again). Nothing is asserted; the figures go to the JSON file and, by hand,
to benchmarks/manual.json (docs/measurements.md: `python benchmarks/measurements.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from avrl.config import CONF, register_resolvers
from avrl.datamodule import AudioQADataModule
from avrl.evaluation import load_for_eval
from avrl.models import load_processor
from avrl.prompts import prompt_spec
from avrl.scoring import prediction_record, score_batch

HERE = Path(__file__).resolve().parent


def config(model: str, items: int, batch: int, max_new_tokens: int):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default="tiny_qwen2_audio")
    parser.add_argument("--smoke", action="store_true", help="2 batch sizes, 4 items, 4 tokens: the code path only")
    parser.add_argument("--out", type=Path, default=HERE / "eval_throughput.json")
    args = parser.parse_args()
    if args.smoke:
        args.batch_sizes, args.items, args.max_new_tokens = [1, 2], 4, 4
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
        "commit": commit.strip(),
        "model": args.model,
        "items": args.items,
        "max_new_tokens": args.max_new_tokens,
        "smoke": args.smoke,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
