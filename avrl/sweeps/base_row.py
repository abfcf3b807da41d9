"""The sweep's base row: the base model (the sweep's `model`, untrained) evaluated once per sweep, as the final
evaluation scores a trained model (greedy val, audio controls, OOD, `final_eval.benchmarks`, pass@k, completion
length; avrl/final_eval.py `evaluate`), logged on the sweep's parent run: its metrics as `base/<metric>`, its
per-item file as the artifact base/final_eval.json. The report shows it as its own row and measures retention
from it (the change of each benchmark's accuracy from the base's).

On the parent, not as a child run: it is no arm and no seed, so it can never be pooled as one, and the children
stay the jobs the sweep ran.

Once per sweep: at the end of a multirun (avrl/sweeps/parent_run.py, before the report) unless
`final_eval.base_row=false`, or by hand, e.g. on a machine with an accelerator when the sweep ran on a cluster:

    python -m avrl.sweeps.base_row SWEEP_DIR

A parent that already holds the base row is left as it is (a rerun does not duplicate it); the metrics are
logged in one batch after every measure was taken, so a failed attempt leaves none. It is evaluated with the
sweep's own config (the command line's, not a job's): its prompt, data and algorithm settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlflow
import torch
from hydra.utils import instantiate
from mlflow.entities import Metric
from omegaconf import DictConfig, OmegaConf

import avrl.config  # noqa: F401  (registers the config's resolvers: a sweep's multirun.yaml uses them)
from avrl import final_eval
from avrl.datamodule import AudioQADataModule
from avrl.models import families, load_model, load_processor
from avrl.prompts import prompt_spec
from avrl.scoring import accuracy_metrics
from avrl.tracking import PARENT_RUN_FILE, TRACKING_URI_FILE

BASE_ARM = "base"
PREFIX = "base/"  # the base row's metrics on the parent run: base/val/accuracy, base/eval/<benchmark>/accuracy, ...
ARTIFACT = "base"  # base/final_eval.json among the parent's artifacts


def base_metrics(parent) -> dict[str, float]:
    """The base row's metrics, under the names a trained run logs them (the prefix removed); {} without one."""
    return {k.removeprefix(PREFIX): v for k, v in parent.data.metrics.items() if k.startswith(PREFIX)}


def evaluate_base(config: DictConfig, sweep_dir: str | Path, tracking_uri: str) -> bool:
    """The base row of the sweep in `sweep_dir` on its parent run, evaluated unless it is there already. Returns
    whether it was evaluated now."""
    sweep_dir = Path(sweep_dir)
    parent_id = (sweep_dir / PARENT_RUN_FILE).read_text().strip()
    client = mlflow.tracking.MlflowClient(tracking_uri)
    if base_metrics(client.get_run(parent_id)):
        return False
    out = sweep_dir / "base"
    metrics, per_item = measure(config, out)
    (out / final_eval.FILE).write_text(json.dumps(per_item))
    client.log_artifact(parent_id, str(out / final_eval.FILE), ARTIFACT)
    for key, value in {"base_model": config.model.name_or_path, "base_prompt": config.prompt.name}.items():
        client.set_tag(parent_id, key, str(value))
    now = int(time.time() * 1000)
    items = [Metric(PREFIX + k, float(v), now, 0) for k, v in metrics.items()]
    for start in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(parent_id, metrics=items[start : start + 1000])
    return True


def measure(config: DictConfig, out: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The base model's val/* and the final evaluation's measures (final_eval.evaluate), per item too."""
    out.mkdir(parents=True, exist_ok=True)
    processor, prompt = load_processor(config.model), prompt_spec(config)
    datamodule = AudioQADataModule(config.data, processor, prompt, splits=("val",), shuffle_seed=config.seed)
    datamodule.setup()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(config.model).eval().to(device)
    functions = config.reward.functions
    format_reward = instantiate(functions.format) if "format" in functions else None
    family = families.get(config.model.family)
    scorer = final_eval.ModelScorer(model, processor, family, prompt, config.algorithm, format_reward, config.model)
    val = scorer.score_loader(datamodule.val_dataloader())
    metrics = accuracy_metrics(val, "val")
    more, per_item = final_eval.evaluate(config, scorer, datamodule, out, metrics.get("val/accuracy"), val, True)
    return {**metrics, **more}, per_item


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate a sweep's base model once, as its base row.")
    parser.add_argument("sweep_dir")
    parser.add_argument("--tracking-uri", help="default: the one the sweep recorded in its folder")
    args = parser.parse_args()
    folder = Path(args.sweep_dir)
    config = OmegaConf.load(folder / "multirun.yaml")  # the sweep's config, as Hydra saved it
    uri = args.tracking_uri or (folder / TRACKING_URI_FILE).read_text().strip()
    print(evaluate_base(config, folder, uri))


if __name__ == "__main__":
    main()
