"""avrl's Hydra sweeper plugins (Hydra finds plugins only under the `hydra_plugins` namespace package).

- `basic_sweeper.AvrlBasicSweeper`: the default for `python run.py -m`; Hydra's basic sweeper, but one failing job
  no longer hides the rest: all jobs run, then a summary, then a non-zero exit.
- `optuna_sweeper.OptunaSweeper`: `python run.py -m search=<preset>`; an Optuna (>= 4) study with RDB storage,
  resume, pruning and MLflow parent/child runs. The logic lives in avrl/sweeps/.
"""
