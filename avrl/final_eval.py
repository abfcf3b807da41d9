"""After training: the final model on the val split under audio-contribution controls and on the data's
out-of-distribution split, logged at the last step and written per item (for paired comparisons between runs).

Metrics: `val_<control>/accuracy` (control = muted, noise, shuffled; avrl/data/audio_controls.py),
`val/audio_reliance` = val/accuracy - val_muted/accuracy, `val_ood/accuracy` (and per category). The per-item
file `final_eval.json` maps each condition to {item id: 1.0 | 0.0}; the sweep report pairs runs on it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from avrl.atomic import write_atomic
from avrl.scoring import accuracy_metrics

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
    if "val_muted/accuracy" in metrics and accuracy is not None:
        metrics["val/audio_reliance"] = accuracy - metrics["val_muted/accuracy"]
    if metrics and trainer.is_global_zero:
        log.info("final model: %s", ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()) if k.count("/") == 1))
    for logger in trainer.loggers if metrics else []:
        logger.log_metrics(metrics, step=trainer.global_step)
    if trainer.is_global_zero:
        write_atomic(out / FILE, json.dumps(per_item))
    return metrics


def _by_id(results: list[dict]) -> dict[str, float]:
    return {r["id"]: r["correct"] for r in results}
