"""Everything about sweeps (`python run.py -m`) in one package:

- parent_run.py: the sweep's parent MLflow run and its nested children; Optuna trial states on the runs
- optuna_search.py: the Optuna study behind `hydra/sweeper=avrl_optuna` (search space, storage, sampler, pruner,
  heartbeats, trial outcomes, pruning during training)
- summary.py: the table of jobs printed at the end of a sweep (sweep_summary.json) and the failed-sweep exit
- report.py: the ablation report of a finished sweep (`python -m avrl.sweeps.report SWEEP_DIR`)

The Hydra plumbing (sweeper classes) is in hydra_plugins/avrl_sweepers, where Hydra looks for plugins.
"""
