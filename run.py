"""avrl's single entry point: `python run.py [group=option ...] [key=value ...]`, or `-m` for a sweep."""

import warnings

import hydra
from omegaconf import DictConfig

import avrl.config  # noqa: F401  (registers the ${avrl_asset:...} resolver before Hydra composes)
from avrl.checkpoint_sweep_eval import evaluate_sweep, is_run_folder
from avrl.console import quiet, quiet_launcher
from avrl.evaluation import evaluate
from avrl.train import train

# conf/hydra/sweeper/basic.yaml shadows Hydra's basic sweeper on purpose (see that file); Hydra would say so on
# every run.
warnings.filterwarnings("ignore", message="\n'hydra/sweeper/basic' is validated against ConfigStore schema")
quiet_launcher()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet()
    if cfg.task == "train":
        metrics = train(cfg)
    elif cfg.task == "eval" and is_run_folder(cfg.ckpt_path):  # a training run's folder: each kept checkpoint
        metrics = evaluate_sweep(cfg)
    elif cfg.task == "eval":
        metrics = evaluate(cfg)
    else:
        raise ValueError(f"task must be 'train' or 'eval', got {cfg.task!r}")
    # The value an Optuna sweep optimises (None when the run logged no such metric: the trial then fails).
    return metrics.get(cfg.objective)


if __name__ == "__main__":
    main()
