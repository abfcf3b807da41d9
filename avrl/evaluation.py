"""`task=eval`: deterministic, batched evaluation that writes MMAU-compatible predictions.

predictions.json is a JSON list of the input records, each with `model_output` (the final answer as the choice's
text, so MMAU's official evaluation.py scores the file unmodified) and `model_raw_output` (the whole completion).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from avrl import tracking
from avrl.algorithms.base import AudioLMModule, accuracy_metrics
from avrl.data.datamodule import AudioQADataModule
from avrl.models import load_model, load_processor
from avrl.protocols import prediction
from avrl.train import prompt_spec, reward_functions

log = logging.getLogger(__name__)


def load_for_eval(cfg: DictConfig, processor, prompt) -> AudioLMModule:
    """The weights to evaluate: the base model; a transformers folder or LoRA adapters (`ckpt_path=<folder>`);
    or a Lightning checkpoint (`ckpt_path=<file>.ckpt`). No reference model is loaded."""
    ckpt = Path(cfg.ckpt_path) if cfg.ckpt_path else None
    model = None
    if ckpt is not None and ckpt.is_dir():
        if (ckpt / "adapter_config.json").exists():
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_model(cfg.model), str(ckpt))
        else:
            model = load_model(cfg.model, path=str(ckpt))
    elif ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt} does not exist")
    functions, weights = reward_functions(cfg)
    module = AudioLMModule(cfg.model, cfg.algorithm, cfg.optim, processor, prompt, functions, weights, model=model)
    module.configure_model()
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return module


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor, prompt = load_processor(cfg.model), prompt_spec(cfg)
    datamodule = AudioQADataModule(cfg.data, processor, prompt, splits=("test",))
    datamodule.setup()
    datamodule.write_skipped(out)
    logger = tracking.make_logger(cfg)
    module = load_for_eval(cfg, processor, prompt)
    module.eval()

    samples, protocol = int(cfg.eval.num_samples), cfg.eval.protocol
    settings = {k: cfg.eval[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k")}
    version = cfg.data.get("version")
    log.info("evaluating %s%s with protocol %s, %s decoding, up to %d new tokens", cfg.data.name,
             f" (version {version})" if version else "", protocol,
             "sampled" if cfg.eval.do_sample else "greedy", settings["max_new_tokens"])
    rows, results, per_sample_accuracy = [], [], [[] for _ in range(samples)]
    with torch.no_grad():
        for batch in tqdm(datamodule.test_dataloader(), desc="evaluating", unit="batch"):
            datamodule.skipped += batch["skipped"]  # unreadable media with data.on_error=skip
            if not batch["items"]:
                continue
            media = module.encode(batch)
            texts = []
            for k in range(samples):
                ids, mask = module.generate(batch, media, 1, sample=bool(cfg.eval.do_sample), draw=k,
                                            settings=settings)
                texts.append(module.decode(ids, mask))
            for i, item in enumerate(batch["items"]):
                raw = texts[0][i]
                parsed = [prediction(protocol, prompt, texts[k][i], item) for k in range(samples)]  # each once
                for k, (_, correct) in enumerate(parsed):
                    per_sample_accuracy[k].append(float(correct))
                record = dict(item.meta) if item.meta else {
                    "id": item.id, "question": item.question, "choices": item.choices, "answer": item.answer,
                    "task": item.category}
                # model_prediction: the key R1-AQA's test script writes; the same value.
                output = parsed[0][0]
                record.update(model_output=output, model_prediction=output, model_raw_output=raw)
                if samples > 1:
                    record["model_raw_outputs"] = [t[i] for t in texts]
                rows.append(record)
                results.append({"category": item.category, "difficulty": item.difficulty,
                                "correct": per_sample_accuracy[0][-1], "format": float("nan")})

    metrics = accuracy_metrics(results, "eval")
    metrics.pop("eval/format", None)
    if samples > 1:
        means = [sum(a) / len(a) for a in per_sample_accuracy]
        metrics["eval/accuracy_mean"] = statistics.mean(means)
        metrics["eval/accuracy_std"] = statistics.stdev(means)
    path = out / "predictions.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    if datamodule.skipped:
        metrics["data/skipped"] = len(datamodule.skipped)
        datamodule.write_skipped(out)
    if logger is not None:
        logger.log_metrics(metrics, step=0)
        tracking.log_file(logger, path)
    if version:
        print(f"{cfg.data.name} version {version}, protocol {protocol}")
    print(table(results, metrics))
    print(f"\npredictions: {path}")
    return metrics


def table(results: list[dict], metrics: dict[str, float]) -> str:
    """Accuracy by task and by difficulty, in the shape MMAU's evaluation script prints."""
    lines = []
    for key, title in (("category", "Task-wise Accuracy:"), ("difficulty", "Difficulty-wise Accuracy:")):
        names = sorted({r[key] for r in results if r.get(key)})
        if names:
            lines += ["*" * 30, title]
            lines += [f"{n} : {metrics[f'eval/accuracy/{n}'] * 100:.2f}%" for n in names]
    lines += ["*" * 30, f"Total Accuracy: {metrics['eval/accuracy'] * 100:.2f}%", "*" * 30]
    return "\n".join(lines)
