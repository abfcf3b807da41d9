"""The sweep's base row: the base model (the sweep's `model`, untrained) evaluated once per sweep, as the final
evaluation scores a trained model (greedy val, audio controls, OOD, `final_eval.benchmarks`, pass@k, completion
length; avrl/final_eval.py `evaluate`), logged as a child of the sweep's parent run tagged `arm=base`. The report
shows it as its own row and measures retention from it (the change of each benchmark's accuracy from the base's).

Once per sweep: at the end of a multirun (avrl/sweeps/parent_run.py, before the report) unless
`final_eval.base_row=false`, or by hand, e.g. on a machine with an accelerator when the sweep ran on a cluster:

    python -m avrl.sweeps.base_row SWEEP_DIR

A sweep whose parent already has a FINISHED base row is left as it is (a rerun does not duplicate it); a failed
attempt is marked FAILED and the next call evaluates again. The base row is never one of an arm's seeds. It is
evaluated with the sweep's own config (the command line's, not a job's): its prompt, data and algorithm settings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
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


def find(client, parent_id: str):
    """The parent's FINISHED base row (the newest), or None."""
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and tags.arm = '{BASE_ARM}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def evaluate_base(config: DictConfig, sweep_dir: str | Path, tracking_uri: str) -> str:
    """The base row of the sweep in `sweep_dir` (evaluated unless it exists): its run id."""
    sweep_dir = Path(sweep_dir)
    parent_id = (sweep_dir / PARENT_RUN_FILE).read_text().strip()
    client = mlflow.tracking.MlflowClient(tracking_uri)
    found = find(client, parent_id)
    if found is not None:
        return found.info.run_id
    tags = {
        "mlflow.parentRunId": parent_id,
        "arm": BASE_ARM,
        "algorithm": BASE_ARM,
        "prompt": str(config.prompt.name),
        "model": str(config.model.name),
        "base_model": str(config.model.name_or_path),
    }
    experiment = client.get_run(parent_id).info.experiment_id
    run_id = client.create_run(experiment, run_name="base model (not trained)", tags=tags).info.run_id
    try:
        out = sweep_dir / "base"
        metrics, per_item = measure(config, out)
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=items[start : start + 1000])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / final_eval.FILE
            path.write_text(json.dumps(per_item))
            client.log_artifact(run_id, str(path))
        (out / final_eval.FILE).write_text(json.dumps(per_item))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


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
