"""Checkpoint sweeps, the evaluation side: `task=eval ckpt_path=<a training run's output_dir>` scores every
checkpoint the run kept (avrl/checkpoint_sweep.py), then its final model, in step order, into one MLflow run
(every metric logged at the checkpoint's training step: the UI draws accuracy by step); writes checkpoints.json and
prints the table and three selections: the final model, the best on validation, and the best on the test set
(optimistic: a choice made on the test set, as R1-AQA's 64.5% was).
"""

from __future__ import annotations

import copy
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from avrl import spool, tracking
from avrl.atomic import write_atomic
from avrl.checkpoint_sweep import STEPS, read_index
from avrl.evaluation import evaluate_one, load_for_eval
from avrl.models import load_processor
from avrl.redaction import scrub
from avrl.scoring import benchmark_config

RESULTS = "checkpoints.json"  # in task=eval's output_dir
TEST_SELECTION = "selected on the test set (optimistic: how R1-AQA reported 64.5%)"


def is_run_folder(path) -> bool:
    """Whether `ckpt_path` names a training run's output folder with kept checkpoints (task=eval sweeps them)."""
    return path not in (None, "auto", "last") and (Path(str(path)) / STEPS).is_dir()


@dataclass
class Checkpoint:
    label: str  # step-000100 | final
    step: int | None
    path: Path
    val_accuracy: float | None
    accuracy: dict[str, float | None] = field(default_factory=dict)  # benchmark -> headline accuracy
    metrics: dict[str, float] = field(default_factory=dict)
    same_as: str | None = None  # final: the kept folder of the same step, whose scores it shares

    def row(self) -> dict:
        out = {"checkpoint": self.label, "step": self.step, "path": str(self.path), "val_accuracy": self.val_accuracy}
        out.update(accuracy=self.accuracy, metrics=self.metrics)
        return out | ({"same_as": self.same_as} if self.same_as else {})


def run_checkpoints(run: Path) -> list[Checkpoint]:
    """The kept checkpoints of a training run folder in step order, then `final_model/` when there is one."""
    steps = run / STEPS
    index = read_index(steps)
    val = {int(k): v for k, v in index.get("val_accuracy", {}).items()}
    found = []
    folders = {int(p.name.removeprefix("step-")): p for p in steps.glob("step-*") if p.is_dir()}
    for step, folder in sorted(folders.items()):  # by number: a step past 999999 has a longer name
        found.append(Checkpoint(folder.name, step, folder, val.get(step)))
    if not found:
        raise FileNotFoundError(f"{steps}: no kept checkpoint (step-*/) to evaluate")
    final = run / "final_model"
    if final.is_dir():
        step = index.get("final_step")
        same = next((c.label for c in found if step is not None and c.step == step), None)
        found.append(Checkpoint("final", step, final, val.get(step) if step is not None else None, same_as=same))
    return found


def evaluate_sweep(cfg: DictConfig) -> dict[str, float]:
    """task=eval with `ckpt_path=<a training run folder>`: each kept checkpoint (and the final model) scored as a
    plain task=eval of its folder scores it, on `data` or each of `eval.benchmarks`; one MLflow run with every
    metric logged at the checkpoint's training step; `checkpoints.json` and the tables in <output_dir>."""
    run, out = Path(cfg.ckpt_path), Path(cfg.output_dir)
    checkpoints = run_checkpoints(run)
    out.mkdir(parents=True, exist_ok=True)
    scrub(out / ".hydra")  # the overrides Hydra saved there, secrets included
    names = list(cfg.eval.benchmarks) if "benchmarks" in cfg.eval else []
    if len(set(names)) != len(names):
        raise ValueError(f"eval.benchmarks={names}: a benchmark named twice")
    for name in names:
        benchmark_config(cfg, name)  # every config checked before any model is loaded
    processor = load_processor(cfg.model)
    logger = tracking.make_logger(cfg)
    spool.attach(logger, out, cfg.logger.tracking_uri or "")
    if logger is not None:
        logger.experiment.set_tag(logger.run_id, "checkpoint_sweep", str(run))
        logger.experiment.set_tag(logger.run_id, "eval_audio", cfg.eval.audio)  # the tags of a plain task=eval
        if names:
            logger.experiment.set_tag(logger.run_id, "eval_benchmarks", ",".join(names))
    by_label = {}
    for ckpt in checkpoints:
        if ckpt.same_as:  # final_model holds the weights of the kept folder of its step: not scored twice
            ckpt.accuracy, ckpt.metrics = by_label[ckpt.same_as].accuracy, by_label[ckpt.same_as].metrics
            continue
        score_checkpoint(cfg, ckpt, names, processor, out / ckpt.label, logger)
        by_label[ckpt.label] = ckpt
    summary = summarize(checkpoints, benchmark_labels(cfg, names))
    write_atomic(out / RESULTS, json.dumps(results(run, cfg, checkpoints, summary), indent=2) + "\n")
    metrics = summary_metrics(summary)
    if logger is not None:
        logger.log_metrics(metrics, step=0)
        for row in ("best_on_validation", "best_on_test"):
            for bench, pick in summary[row].items():
                if pick is not None:
                    logger.experiment.set_tag(logger.run_id, f"{row}/{bench}", pick["checkpoint"])
        tracking.log_file(logger, out / RESULTS)
        spool.finish(logger)
    print(report(checkpoints, summary, run))
    print(f"\nresults: {out / RESULTS}")
    return metrics


def benchmark_labels(cfg: DictConfig, names: list[str]) -> list[str]:
    return names or [cfg.data.name]


def score_checkpoint(cfg: DictConfig, ckpt: Checkpoint, names: list[str], processor, out: Path, logger) -> None:
    """One checkpoint, as `task=eval ckpt_path=<its folder>` scores it: its files in `out`, its metrics logged at
    its training step (the MLflow UI's accuracy-by-step curve) and kept on `ckpt`."""
    one = copy.deepcopy(cfg)
    with open_dict(one):
        one.ckpt_path = str(ckpt.path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # as a plain task=eval starts
    print(f"\n##### {ckpt.label}" + (f" (step {ckpt.step})" if ckpt.step is not None else "") + f": {ckpt.path}")
    policy = load_for_eval(one, processor)
    runs = [(name, benchmark_config(one, name)) for name in names] or [(None, one)]
    for name, run_cfg in runs:
        # No logger here: evaluate_one would log every checkpoint's files to the same artifact path.
        score = evaluate_one(run_cfg, policy, processor, out / name if name else out, None, name)
        ckpt.metrics.update(score.metrics)
        ckpt.accuracy[name or cfg.data.name] = score.accuracy if score.answered else None
    del policy
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next checkpoint loads into the memory this one held
    if logger is not None:
        if ckpt.step is not None:
            logger.log_metrics(ckpt.metrics, step=ckpt.step)
        logger.experiment.log_artifacts(logger.run_id, str(out), ckpt.label)


def summarize(checkpoints: list[Checkpoint], benchmarks: list[str]) -> dict:
    """Per benchmark: the final model; the best on validation (the highest val/accuracy of the training run;
    ties: the earliest step); the best on the test set, each benchmark's own highest (ties: the earliest)."""
    final = next((c for c in checkpoints if c.label == "final"), None)
    validated = [c for c in checkpoints if c.val_accuracy is not None]
    best_val = max(validated, key=lambda c: (c.val_accuracy, -_order(c)), default=None)
    summary = {"final": {}, "best_on_validation": {}, "best_on_test": {}}
    for bench in benchmarks:
        summary["final"][bench] = _pick(final, bench)
        summary["best_on_validation"][bench] = _pick(best_val, bench)
        scored = [c for c in checkpoints if c.accuracy.get(bench) is not None]
        best = max(scored, key=lambda c: (c.accuracy[bench], -_order(c)), default=None)
        summary["best_on_test"][bench] = _pick(best, bench)
    return summary


def _order(ckpt: Checkpoint) -> float:
    return ckpt.step if ckpt.step is not None else float("inf")


def _pick(ckpt: Checkpoint | None, bench: str) -> dict | None:
    if ckpt is None:
        return None
    return {
        "checkpoint": ckpt.label,
        "step": ckpt.step,
        "val_accuracy": ckpt.val_accuracy,
        "accuracy": ckpt.accuracy.get(bench),
    }


def summary_metrics(summary: dict) -> dict[str, float]:
    """sweep/<row>/<benchmark>/accuracy: the three selections, comparable across runs in the MLflow UI."""
    return {
        f"sweep/{row}/{bench}/accuracy": pick["accuracy"]
        for row, picks in summary.items()
        for bench, pick in picks.items()
        if pick is not None and pick["accuracy"] is not None
    }


def results(run: Path, cfg: DictConfig, checkpoints: list[Checkpoint], summary: dict) -> dict:
    return {
        "run": str(run),
        "protocol": cfg.eval.protocol,
        "accuracy": "each benchmark's headline accuracy: its official rule where it has one, else the protocol's",
        "checkpoints": [c.row() for c in checkpoints],
        "summary": summary,
        "best_on_test_note": TEST_SELECTION,
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}"


def report(checkpoints: list[Checkpoint], summary: dict, run: Path) -> str:
    """The step x accuracy (x benchmark) table, then the three selections."""
    benchmarks = list(summary["final"])
    header = ["checkpoint", "step", "val/accuracy", *benchmarks]
    lines = [f"\ncheckpoints of {run} (accuracy %):", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in checkpoints:
        label = c.label + (f" (= {c.same_as})" if c.same_as else "")
        cells = [label, "" if c.step is None else str(c.step), _pct(c.val_accuracy)]
        lines.append("| " + " | ".join(cells + [_pct(c.accuracy.get(b)) for b in benchmarks]) + " |")
    rows = (
        ("final", "final model"),
        ("best_on_validation", "best on validation (highest val/accuracy)"),
        ("best_on_test", f"best on test: {TEST_SELECTION}"),
    )
    lines += ["", "| selection | " + " | ".join(benchmarks) + " |", "|---|" + "---|" * len(benchmarks)]
    for key, title in rows:
        cells = []
        for b in benchmarks:
            pick = summary[key][b]
            where = "" if pick is None else pick["checkpoint"] if pick["step"] is None else f"step {pick['step']}"
            cells.append("none" if pick is None else f"{_pct(pick['accuracy'])} ({where})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
