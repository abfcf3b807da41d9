"""After training: the final model on the val split under audio-contribution controls and on the data's
out-of-distribution split, logged at the last step and written per item (for paired comparisons between runs).

Metrics: `val_<control>/accuracy` (control = muted, noise, shuffled; avrl/data/audio_controls.py),
`val/audio_reliance` = val/accuracy - val_muted/accuracy, `val_ood/accuracy` (and per category). The per-item
file `final_eval.json` maps each condition to {item id: 1.0 | 0.0}; the sweep report pairs runs on it.

`final_eval.benchmarks=[mmau,mmar,...]`: the final model also on those data options (composed as task=eval's
`eval.benchmarks` are, paths from their env keys or `eval.data.<name>`), greedy with the run's own prompt and
protocol, scored by each one's official rule: `eval/<benchmark>/...` (the sweep report's benchmark columns),
predictions in the official file under <output_dir>/final_eval/<benchmark>/, a benchmark x category table logged.

What training cost (avrl/costs.py; each off by default, the toy-world sweeps turn them on):
- `final_eval.kl.samples=S`: KL(base || tuned) per token on the val prompts, S completions per prompt sampled from
  the base: `final/kl_k3`, `final/kl_k3_se`, `final/kl_k1`, `final/kl_k1_se`, `final/kl_sequences`;
- `final_eval.pass_at_k.samples=n`: pass@k (unbiased, k in `pass_at_k.ks`) from n samples per val item:
  `final/pass_at_<k>`, per item in final_eval.json under `pass_at_<k>`;
- `final_eval.completion_tokens=true`: `final/completion_tokens`, the mean tokens of the greedy val completions;
- `final_eval.params.enabled=true`: `final/params_changed_share` (share of fp32 parameter elements with
  |trained - base| > `params.threshold`) and `final/update_norm`, overall and per top-level module (`/<module>`).

`final_eval.ood_shifts=[band_outside,duration,noise,wording]` (synthetic data): each shift of the toy world
(avrl/data/synthetic.py) as its own split, `val_ood_<shift>/accuracy` (and per category), per item in
final_eval.json.

`evaluate` is the part that needs no trained model (the sweep's base row runs it on the base: avrl/sweeps/base_row.py).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from avrl import costs, measures, strategies, tracking
from avrl.atomic import write_atomic
from avrl.data import synthetic
from avrl.datamodule import AudioQADataModule
from avrl.policy import Policy, to_device
from avrl.rollout import sampling_settings
from avrl.rules import BENCHMARKS
from avrl.scoring import (
    BenchmarkScore,
    accuracy_metrics,
    benchmark_config,
    benchmark_score,
    benchmark_table,
    prediction_record,
    rule_options,
    score_batch,
    write_predictions,
)

log = logging.getLogger(__name__)
FILE = "final_eval.json"
PREFIX = "final"


def option(settings: DictConfig, key: str, default=None):
    """A final_eval key (dotted), its default when an older config lacks it."""
    return OmegaConf.select(settings, key, default=default)


def run(cfg: DictConfig, trainer, module, datamodule, out: Path, accuracy: float | None) -> dict[str, float]:
    """Score the controls, the OOD split, the benchmarks and the cost measures; log them (rank 0's logger) at the
    last step and write final_eval.json. `accuracy` is the final model's val/accuracy (for the audio reliance)."""
    zero = trainer.is_global_zero
    metrics, per_item = evaluate(cfg, module, datamodule, out, accuracy, module.last_val_results, zero)
    metrics.update(costs_to_base(cfg, trainer, module, datamodule))
    if metrics and trainer.is_global_zero:
        log.info("final model: %s", ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()) if k.count("/") == 1))
    for logger in trainer.loggers if metrics else []:
        logger.log_metrics(metrics, step=trainer.global_step)
    if trainer.is_global_zero:
        write_atomic(out / FILE, json.dumps(per_item))
    return metrics


def evaluate(
    cfg: DictConfig, module, datamodule, out: Path, accuracy: float | None, val_results: list[dict], write: bool
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The measures of one model that need no base to compare with: audio controls, OOD, benchmarks, pass@k and
    completion length. `module`: anything with the scoring methods of avrl's Lightning modules (score_loader,
    score_greedy, transfer_batch_to_device, policy, prompt, processor, device, loggers, algo). Returns the metrics
    and the per-item table (condition -> item id -> value)."""
    settings = cfg.final_eval
    per_item = {"val": _by_id(val_results)}
    metrics: dict[str, float] = {}
    conditions = [("val", control) for control in settings.audio]
    if settings.ood and datamodule.has_split("ood"):
        conditions.append(("ood", "real"))
    for split, audio in conditions:
        name = "val_ood" if split == "ood" else f"val_{audio}"
        results = module.score_loader(datamodule.control_loader(split, audio))
        metrics.update(accuracy_metrics(results, name))
        per_item[name] = _by_id(results)
    shifts = [str(shift) for shift in option(settings, "ood_shifts", []) or []]
    if shifts and cfg.data.format != "synthetic":  # a sweep preset's shifts under a real data option: none to score
        log.warning(
            "final_eval.ood_shifts=%s: data.format=%s has no such shifts (synthetic only)", shifts, cfg.data.format
        )
        shifts = []
    for name, results in shift_results(cfg.data, cfg.seed, module, shifts).items():
        metrics.update(accuracy_metrics(results, name))
        per_item[name] = _by_id(results)
    names = list(option(settings, "benchmarks", []))
    configs = [(name, benchmark_config(cfg, name)) for name in names]  # every path resolved before the first
    scores = []
    for name, bench in configs:
        score, results = score_benchmark(bench, name, module, out / "final_eval" / name, write)
        metrics.update(score.metrics)
        per_item[f"eval/{name}"] = _by_id(results)
        scores.append(score)
    if scores and write:
        log.info("final model on the benchmarks (%%, official rules):\n%s", benchmark_table(scores))
    if "val_muted/accuracy" in metrics and accuracy is not None:
        metrics["val/audio_reliance"] = accuracy - metrics["val_muted/accuracy"]
    pass_metrics, pass_items = pass_at_k(settings, module, datamodule)
    metrics.update(pass_metrics)
    per_item.update(pass_items)
    if option(settings, "completion_tokens", False):
        lengths = costs.greedy_lengths(module.policy, datamodule.val_dataloader(), sampling_settings(module.algo))
        metrics[f"{PREFIX}/completion_tokens"] = float(np.mean(lengths))
    return metrics, per_item


def shift_results(data: DictConfig, seed: int, module, shifts, loaders: dict | None = None) -> dict[str, list[dict]]:
    """val_ood_<shift> -> the module's greedy results on each OOD shift of the synthetic data. `loaders` (shift ->
    loader), when given, keeps the loaders between calls (the validation callback scores the same items each time)."""
    loaders = {} if loaders is None else loaders
    out = {}
    for shift in shifts:
        if shift not in loaders:
            loaders[shift] = shift_loader(data, seed, module, shift)
        out[f"val_ood_{shift}"] = module.score_loader(loaders[shift])
    return out


def shift_loader(data: DictConfig, seed: int, module, shift: str):
    """The synthetic data's OOD shift `shift` (avrl/data/synthetic.py SHIFTS: split ood_<shift>, data.ood_size
    items, gold labels, the run's tasks), loaded as the OOD split is (`data`: the run's data config, `seed` its
    seed). The data module sizes a synthetic split by `data.<split>_size`: a copy of the data config gets that key
    here."""
    if shift not in synthetic.SHIFTS:
        raise ValueError(
            f"final_eval.ood_shifts: {shift!r} is no shift of the synthetic data: {list(synthetic.SHIFTS)}"
        )
    data = copy.deepcopy(data)
    with open_dict(data):
        data[f"ood_{shift}_size"] = data.ood_size or data.val_size
    datamodule = AudioQADataModule(data, module.processor, module.prompt, splits=(), shuffle_seed=seed)
    return datamodule.control_loader(f"ood_{shift}")


def pass_at_k(settings: DictConfig, module, datamodule) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """pass@k on the val items from `pass_at_k.samples` keyed samples each (none when 0): the mean over items of
    the unbiased estimator, and each item's own estimate (for the report's paired comparisons)."""
    n = int(option(settings, "pass_at_k.samples", 0) or 0)
    if n <= 0:
        return {}, {}
    ks = [int(k) for k in option(settings, "pass_at_k.ks", [1]) if int(k) <= n]
    if not ks:
        raise ValueError(f"final_eval.pass_at_k.ks={list(settings.pass_at_k.ks)}: every k is above samples={n}")
    length = option(settings, "pass_at_k.max_new_tokens") or module.algo.max_completion_length
    sample = costs.full_distribution(length, option(settings, "pass_at_k.temperature", 1.0))
    results = costs.sampled_results(module.policy, datamodule.val_dataloader(), module.prompt, n, sample)
    metrics = measures.pass_at_k_metrics(results, ks, PREFIX)
    scored = [r for r in results if not any(np.isnan(c) for c in r["correct_per_sample"])]
    per_item = {
        f"pass_at_{k}": {r["id"]: measures.pass_at_k(n, int(sum(r["correct_per_sample"])), k) for r in scored}
        for k in ks
    }
    return metrics, per_item


def costs_to_base(cfg: DictConfig, trainer, module, datamodule) -> dict[str, float]:
    """The measures against the base model: KL(base || tuned) and the parameters changed (each when asked)."""
    settings, metrics = cfg.final_eval, {}
    samples = int(option(settings, "kl.samples", 0) or 0)
    if samples > 0:
        length, temperature = option(settings, "kl.max_new_tokens"), option(settings, "kl.temperature", 1.0)
        metrics.update(kl_metrics(module, datamodule.val_dataloader(), samples, length, temperature))
    if option(settings, "params.enabled", False):
        threshold = float(option(settings, "params.threshold", measures.DEFAULT_THRESHOLD))
        with strategies.full_weights(trainer.strategy, module.model):
            after = costs.trained_weights(module.model, module.model_cfg, module.algo.lora)
        change = measures.parameter_change(costs.base_weights(module.model_cfg, module), after, threshold)
        metrics.update({f"{PREFIX}/{_share(k)}": v for k, v in change.items()})
    return metrics


def kl_metrics(
    module, loader, samples: int, max_new_tokens: int | None = None, temperature: float = 1.0, prefix: str = PREFIX
) -> dict[str, float]:
    """KL(base || tuned) per token on `loader`'s prompts, `samples` base completions each (up to `max_new_tokens`,
    default algorithm.max_completion_length): <prefix>/kl_k3, kl_k3_se, kl_k1, kl_k1_se, kl_sequences."""
    sample = costs.full_distribution(max_new_tokens or module.algo.max_completion_length, temperature)
    model, context = costs.base_model(module, module.model_cfg)
    base = Policy(model, module.processor, module.family, shared_prefix=False)
    with costs.eval_mode(module.model, model):
        estimates = costs.kl_to_base(base, module.policy, loader, samples, sample, context)
    out = {f"{prefix}/kl_sequences": float(estimates["k3"].n)}
    for name, estimate in estimates.items():
        out[f"{prefix}/kl_{name}"], out[f"{prefix}/kl_{name}_se"] = estimate.mean, estimate.se
    return out


def _share(key: str) -> str:
    """measures.parameter_change's names under the report's: params_changed -> params_changed_share."""
    return key.replace("params_changed", "params_changed_share", 1)


class ModelScorer:
    """A model scored as avrl's Lightning modules score it during validation (greedy, strict protocol, the format
    reward), without a trainer: what `evaluate` needs of a module, for a model that was not trained here (the
    sweep's base row)."""

    def __init__(self, model, processor, family, prompt, algo: DictConfig, format_reward=None, model_cfg=None):
        self.policy = Policy(model, processor, family, shared_prefix=False)
        self.model, self.processor, self.family, self.prompt, self.algo = model, processor, family, prompt, algo
        self.format_reward, self.model_cfg, self.loggers = format_reward, model_cfg, []

    @property
    def device(self):
        return next(self.model.parameters()).device

    def transfer_batch_to_device(self, batch, device, dataloader_idx=0):
        return to_device(batch, device)

    @torch.no_grad()
    def score_greedy(self, batch: dict) -> list[dict]:
        return score_batch(
            self.policy, batch, self.prompt, sampling_settings(self.algo), format_reward=self.format_reward
        )

    def score_loader(self, loader) -> list[dict]:
        results = []
        for batch in loader:
            if batch["items"]:
                results += self.score_greedy(self.transfer_batch_to_device(batch, self.device))
        return results


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
