"""After training: the final model on the val split under audio-contribution controls and on the data's
out-of-distribution split, logged at the last step and written per item (for paired comparisons between runs).

Metrics: `val_<control>/accuracy` (control = muted, noise, shuffled; avrl/data/audio_controls.py),
`val/audio_reliance` = val/accuracy - val_muted/accuracy, `val_ood/accuracy` (and per category). The per-item
file `final_eval.json` maps each condition to {item id: 1.0 | 0.0}; the sweep report pairs runs on it.

`final_eval.benchmarks=[mmau,mmar,...]`: the final model also on those data options (composed as task=eval's
`eval.benchmarks` are, paths from their env keys or `eval.data.<name>`), greedy with the run's own prompt and
protocol, scored by each one's official rule: `eval/<benchmark>/...` (the sweep report's benchmark columns),
predictions in the official file under <output_dir>/final_eval/<benchmark>/, a benchmark x category table logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig

from avrl import tracking
from avrl.atomic import write_atomic
from avrl.datamodule import AudioQADataModule
from avrl.rules import BENCHMARKS
from avrl.scoring import (
    BenchmarkScore,
    accuracy_metrics,
    benchmark_config,
    benchmark_score,
    benchmark_table,
    prediction_record,
    rule_options,
    write_predictions,
)

log = logging.getLogger(__name__)
FILE = "final_eval.json"


def run(cfg: DictConfig, trainer, module, datamodule, out: Path, accuracy: float | None) -> dict[str, float]:
    """Score the controls and the OOD split; log them (rank 0's logger) and write final_eval.json. `accuracy` is
    the final model's val/accuracy (for the audio reliance)."""
    settings = cfg.final_eval
    per_item = {"val": _by_id(module.last_val_results)}
    metrics: dict[str, float] = {}
    conditions = [("val", control) for control in settings.audio]
    if settings.ood and datamodule.has_split("ood"):
        conditions.append(("ood", "real"))
    for split, audio in conditions:
        name = "val_ood" if split == "ood" else f"val_{audio}"
        results = module.score_loader(datamodule.control_loader(split, audio))
        metrics.update(accuracy_metrics(results, name))
        per_item[name] = _by_id(results)
    names = list(settings.benchmarks) if "benchmarks" in settings else []
    configs = [(name, benchmark_config(cfg, name)) for name in names]  # every path resolved before the first
    scores = []
    for name, bench in configs:
        score, results = score_benchmark(bench, name, module, out / "final_eval" / name, trainer.is_global_zero)
        metrics.update(score.metrics)
        per_item[f"eval/{name}"] = _by_id(results)
        scores.append(score)
    if scores and trainer.is_global_zero:
        log.info("final model on the benchmarks (%%, official rules):\n%s", benchmark_table(scores))
    if "val_muted/accuracy" in metrics and accuracy is not None:
        metrics["val/audio_reliance"] = accuracy - metrics["val_muted/accuracy"]
    if metrics and trainer.is_global_zero:
        log.info("final model: %s", ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()) if k.count("/") == 1))
    for logger in trainer.loggers if metrics else []:
        logger.log_metrics(metrics, step=trainer.global_step)
    if trainer.is_global_zero:
        write_atomic(out / FILE, json.dumps(per_item))
    return metrics


def score_benchmark(cfg: DictConfig, name: str, module, out: Path, write: bool) -> tuple[BenchmarkScore, list[dict]]:
    """One benchmark (`cfg`: the run's config with its data option, scoring.benchmark_config): every item scored
    greedily by the module (each rank scores all of them), the records written with the official key (`write`:
    rank 0), scored by the benchmark's rule. Returns the score and the protocol's per-item results."""
    datamodule = AudioQADataModule(cfg.data, module.processor, module.prompt, splits=("test",), shuffle_seed=cfg.seed)
    datamodule.setup()
    rows, results = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            datamodule.skipped += batch["skipped"]
            if not batch["items"]:
                continue
            scored = module.score_greedy(module.transfer_batch_to_device(batch, module.device, 0))
            rows += [prediction_record(item, r, 1, cfg.data.format) for item, r in zip(batch["items"], scored)]
            results += scored
    score = benchmark_score(name, cfg.data.format, rows, results, f"eval/{name}", rule_options(cfg))
    if write:
        rule = BENCHMARKS[cfg.data.format] if cfg.data.format in BENCHMARKS else None
        paths = set(write_predictions(out, rule, rows))
        datamodule.write_skipped(out)
        for logger in [x for x in module.loggers if isinstance(x, MLFlowLogger)]:  # the run's artifacts
            for path in sorted(paths):
                tracking.log_file(logger, path, f"final_eval/{name}")
    return score, results


def _by_id(results: list[dict]) -> dict[str, float]:
    return {r["id"]: r["correct"] for r in results}
