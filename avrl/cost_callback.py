"""What training costs, at every validation during training (for the report's "at matched accuracy" table and its
KL- and retention-vs-target curves): a Lightning callback, enabled from a config's `callbacks:` key, e.g. in a
sweep preset

    callbacks:
      costs:
        _target_: avrl.cost_callback.CostsAtValidation
        kl_samples: ${final_eval.kl.samples}
        benchmarks: ${final_eval.benchmarks}

After each validation inside training (not the one before the first step, whose model is the base, nor the final
model's, which avrl/final_eval.py measures) it logs, at the validated step: `val/kl_k3`, `val/kl_k3_se`,
`val/kl_k1`, `val/kl_k1_se`, `val/kl_sequences` (KL(base || tuned) on the val prompts, as final_eval.kl) and, per
benchmark, `val_eval/<benchmark>/accuracy` (and per category): the benchmark scored greedily as the final
evaluation scores it. With `ood=true` also the data's OOD split (`val_ood/accuracy`) and each of `ood_shifts`
(`val_ood_<shift>/accuracy`, synthetic data), as the final evaluation scores them: the matched-accuracy table then
reads OOD accuracy at the step where a run first reaches X, not only at its last step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from avrl import final_eval
from avrl.scoring import accuracy_metrics, benchmark_config


class CostsAtValidation(Callback):
    def __init__(
        self,
        kl_samples: int = 0,
        kl_max_new_tokens: int | None = None,
        kl_temperature: float = 1.0,
        benchmarks=(),
        eval_data=None,
        ood: bool = False,
        ood_shifts=(),
    ):
        self.kl_samples, self.kl_max_new_tokens, self.kl_temperature = (
            int(kl_samples),
            kl_max_new_tokens,
            kl_temperature,
        )
        # Each benchmark's data option composed now (a bad name fails before training): eval_data holds the
        # per-benchmark overrides, as the config's eval.data.
        overrides = OmegaConf.to_container(OmegaConf.create(eval_data or {}))
        holder = OmegaConf.create({"seed": 0, "eval": {"data": overrides}})  # seed: the shuffled control's only
        self.benchmarks = [(str(name), benchmark_config(holder, str(name))) for name in benchmarks]
        self.ood, self.ood_shifts = bool(ood), [str(shift) for shift in ood_shifts or []]
        self._shift_loaders: dict[str, object] = {}  # built once: the same items at every validation

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        metrics = measure(self, module, trainer.datamodule)
        for logger in trainer.loggers if metrics else []:
            logger.log_metrics(metrics, step=trainer.global_step)


def measure(callback: CostsAtValidation, module, datamodule) -> dict[str, float]:
    """The callback's measures of the module's model as it is now."""
    metrics: dict[str, float] = {}
    if callback.kl_samples > 0:
        metrics.update(
            final_eval.kl_metrics(
                module,
                datamodule.val_dataloader(),
                callback.kl_samples,
                callback.kl_max_new_tokens,
                callback.kl_temperature,
                prefix="val",
            )
        )
    last = 0 < module.trainer.max_steps <= module.global_step  # final_eval scores the last model, same names
    if callback.ood and not last:
        metrics.update(ood_metrics(callback, module, datamodule))
    with tempfile.TemporaryDirectory() as tmp:  # nothing written (write=False): the path is never used
        for name, cfg in callback.benchmarks:
            score, _ = final_eval.score_benchmark(cfg, name, module, Path(tmp) / name, write=False)
            metrics.update({f"val_{k}": v for k, v in score.metrics.items()})  # eval/<b>/... -> val_eval/<b>/...
    return metrics


def ood_metrics(callback: CostsAtValidation, module, datamodule) -> dict[str, float]:
    """The OOD split and each OOD shift (synthetic data only; none under a real data option), greedy."""
    metrics: dict[str, float] = {}
    if datamodule.has_split("ood"):
        metrics.update(accuracy_metrics(module.score_loader(datamodule.control_loader("ood")), "val_ood"))
    if datamodule.cfg.format != "synthetic":
        return metrics
    shifts = final_eval.shift_results(
        datamodule.cfg, datamodule.shuffle_seed, module, callback.ood_shifts, callback._shift_loaders
    )
    for name, results in shifts.items():
        metrics.update(accuracy_metrics(results, name))
    return metrics
