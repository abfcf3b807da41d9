"""The Optuna search: search space from Hydra's sweep syntax, trial outcomes, seeding on resume (fast), and a real
study through the CLI (slow): pruning, a crashing trial, resume, MLflow parent and children."""

import json
import math

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from avrl.sweeps import optuna_search as search
from tests.support import mlflow_runs, run_cli


def test_sweep_syntax_maps_to_optuna_distributions():
    space, fixed = search.search_space(
        {
            "optim.lr": "tag(log, interval(1e-5, 1e-2))",
            "algorithm.beta": "interval(0, 0.1)",
            "algorithm.num_generations": "choice(2, 4, 8)",
            "prompt": "no_think,think",
            "data.batch_size": "range(4, 17, 4)",
            "algorithm.max_completion_length": "int(interval(8, 64))",
        },
        ["seed=3", "algorithm.beta=interval(0.01, 0.05)"],
    )
    assert space["optim.lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert space["algorithm.beta"] == FloatDistribution(0.01, 0.05)  # the command line wins over the preset
    assert space["algorithm.num_generations"] == CategoricalDistribution([2, 4, 8])
    assert space["prompt"] == CategoricalDistribution(["no_think", "think"])
    assert space["data.batch_size"] == IntDistribution(4, 16, step=4)  # range's stop is excluded, as in Python
    assert space["algorithm.max_completion_length"] == IntDistribution(8, 64)
    assert fixed == ["seed=3"]


def test_a_fixed_command_line_value_replaces_a_searched_one():
    space, fixed = search.search_space({"optim.lr": "interval(1e-5, 1e-2)"}, ["optim.lr=0.001"])
    assert space == {} and fixed == ["optim.lr=0.001"]


@pytest.mark.parametrize("value", [0.000123, 3, "think", "a b,c", True, None, "sqlite:///x.db"])
def test_trial_values_round_trip_through_hydras_override_parser(value):
    (override,) = OverridesParser.create().parse_overrides([search.as_override("k", value)])
    assert override.value() == value and not override.is_sweep_override()


@pytest.mark.parametrize(
    "value, error, state",
    [
        (0.5, None, TrialState.COMPLETE),
        (float("nan"), None, TrialState.FAIL),
        (float("inf"), None, TrialState.FAIL),
        (None, None, TrialState.FAIL),  # the objective metric was never logged
        (None, ValueError("bad"), TrialState.FAIL),
        (None, optuna.TrialPruned("pruned at step 2"), TrialState.PRUNED),
    ],
)
def test_job_outcomes_become_trial_states(value, error, state):
    got, number, reason = search.outcome(value, error)
    assert got == state
    assert (number == value) if state == TrialState.COMPLETE else number is None
    assert bool(reason) == (state != TrialState.COMPLETE)


def test_a_resumed_study_does_not_replay_its_random_trials():
    cfg = {"_target_": "optuna.samplers.RandomSampler", "seed": 7}
    space = {"x": FloatDistribution(0, 1)}

    def draws(trials_so_far, n=3):
        study = optuna.create_study(sampler=search.make_sampler(cfg, trials_so_far))
        return [study.ask(space).params["x"] for _ in range(n)]

    assert draws(0) == draws(0)  # seeded: reproducible
    assert not set(draws(0)) & set(draws(3))  # a resume after 3 trials draws new points


def test_heartbeats_survive_a_database_blip(tmp_path, caplog):
    """The first two heartbeats fail as a dropped connection does; the thread retries, logs, and records again."""
    import threading

    import sqlalchemy

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=60)
    study = optuna.create_study(storage=storage)
    trial_id = study.ask()._trial_id
    calls, recorded = [], threading.Event()
    real = storage.record_heartbeat

    def flaky(trial):
        calls.append(trial)
        if len(calls) <= 2:
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("terminating connection"))
        real(trial)
        recorded.set()

    storage.record_heartbeat = flaky
    with caplog.at_level("WARNING", logger="avrl.sweeps.optuna_search"):
        with search.Heartbeat(storage, trial_id, interval=60):
            assert recorded.wait(timeout=60)  # (a hang guard: the retries come after 1 s and 2 s)
    assert len(calls) == 3 and storage._get_stale_trial_ids(study._study_id) == []
    assert "retrying in 1 s" in caplog.text and "recorded again after 2 failed attempts" in caplog.text


def test_a_trial_the_cluster_ended_is_asked_again_with_its_parameters_and_counted_once(monkeypatch):
    class Left(RuntimeError):
        state = "PREEMPTED"

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    space = {"lr": FloatDistribution(1e-6, 1e-3, log=True)}
    first = search.ask(study, space)
    assert not search.retry(study, first, ValueError("a bug of its own"))  # the job's own fault: no retry
    assert search.retry(study, first, Left("SLURM job 7 ended PREEMPTED without a result"))
    study.tell(first, None, TrialState.FAIL)
    assert search.counted_trials(study) == 0  # the failed attempt no longer counts towards n_trials
    second = search.ask(study, space)
    assert second.params == first.params and second.user_attrs == {"retry_of": 0, "attempt": 2}
    assert search.retry(study, second, RuntimeError("Job not requeued because: timed-out too many times."))
    study.tell(second, None, TrialState.FAIL)
    third = search.ask(study, space)
    assert third.user_attrs == {"retry_of": 0, "attempt": 3} and not search.retry(study, third, Left("again"))
    study.tell(third, None, TrialState.FAIL)
    assert search.counted_trials(study) == 1  # three attempts of one trial: counted once

    cancelled = []
    monkeypatch.setattr(
        "subprocess.run",
        lambda args, **kw: cancelled.append(args) or __import__("subprocess").CompletedProcess(args, 0, "", ""),
    )
    from types import SimpleNamespace

    search.cancel_job(SimpleNamespace(number=2, user_attrs={"slurm_job": "12_3"}))  # (a stale trial, frozen)
    assert cancelled == [["scancel", "12_3"]]


def test_the_grpo_search_preset_composes_into_a_search_space(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.support import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["search=grpo_optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.storage == "sqlite:///optuna.db"
    assert sweeper.study_name == "grpo_tiny_qwen2_audio_synthetic"
    space, _ = search.search_space(OmegaConf.to_container(sweeper.params), [])
    assert space["optim.lr"].log and set(space) >= {"optim.lr", "algorithm.beta", "algorithm.num_generations"}
    assert isinstance(search.make_pruner(sweeper.pruner), optuna.pruners.MedianPruner)


STUDY = """# @package _global_
defaults:
  - override /hydra/sweeper: avrl_optuna
  - override /hydra/sweeper/pruner: none
hydra:
  sweeper:
    study_name: test
    storage: sqlite:///{tmp}/optuna.db
    n_trials: 4
    pruner: {{_target_: optuna.pruners.ThresholdPruner, lower: 0.05}}
    params:
      algorithm.max_completion_length: choice(1, 10)
      algorithm.loss_type: choice(grpo, no_such_loss)
      optim.lr: tag(log, interval(1e-5, 1e-4))
    enqueue_trials:
      - {{algorithm.max_completion_length: 10, algorithm.loss_type: grpo, optim.lr: 1e-5}}
      # one token cannot hold <answer>...</answer>: accuracy 0 at the first validation, below the threshold
      - {{algorithm.max_completion_length: 1, algorithm.loss_type: grpo, optim.lr: 1e-5}}
      # a bad value in one trial: GRPO raises at its first step
      - {{algorithm.max_completion_length: 10, algorithm.loss_type: no_such_loss, optim.lr: 1e-5}}
      - {{algorithm.max_completion_length: 10, algorithm.loss_type: grpo, optim.lr: 2e-5}}
"""


def run_study(tmp_path, *overrides):
    return run_cli(
        "-m",
        "search=test_study",
        f"hydra.searchpath=[file://{tmp_path}/conf]",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.val_size=8",
        "data.batch_size=2",
        "algorithm.num_generations=2",
        "trainer.enable_progress_bar=false",
        "save_final_model=false",
        *overrides,
        tmp_path=tmp_path,
        check=False,
    )


@pytest.mark.slow
def test_optuna_study_prunes_survives_a_crash_resumes_and_is_tracked(tmp_path):
    (tmp_path / "conf/search").mkdir(parents=True)
    (tmp_path / "conf/search/test_study.yaml").write_text(STUDY.format(tmp=tmp_path))
    out = run_study(tmp_path, f"hydra.sweep.dir={tmp_path}/first")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    study = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].intermediate_values == {2: 0.0}  # reported at the validation of step 2, then stopped
    assert "no_such_loss" in study.trials[2].user_attrs["reason"]
    assert all(0 <= t.value <= 1 for t in study.trials if t.state == TrialState.COMPLETE)
    summary = json.loads((tmp_path / "first/sweep_summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == [s.name for s in states]

    # MLflow: one parent for the study, one child per trial, the trial's number as a param and its state as a tag.
    client, runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("optuna_study") == "test"]
    children = {
        int(r.data.params["trial"]): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert sorted(children) == [0, 1, 2, 3] and len(runs) == 5
    for trial in study.trials:
        child = children[trial.number]
        assert child.data.tags["optuna_state"] == trial.state.name
        assert child.data.params["algorithm.loss_type"] == trial.params["algorithm.loss_type"]
        assert math.isclose(float(child.data.params["optim.lr"]), trial.params["optim.lr"])
        assert child.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[trial.state.name]
    assert "error.txt" in {a.path for a in client.list_artifacts(children[2].info.run_id)}
    best = study.best_trial
    assert parent.data.metrics["best/val/accuracy"] == best.value
    assert parent.data.tags["best_trial"] == str(best.number)

    # The same command with a larger n_trials resumes: two new trials, the first four kept, no parameters replayed.
    out = run_study(
        tmp_path, f"hydra.sweep.dir={tmp_path}/second", "hydra.sweeper.n_trials=6", "algorithm.loss_type=grpo"
    )  # a fixed value on the command line takes it out of the search
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.trials) == 6 and [t.state for t in study.trials[:4]] == states
    old, new = [t.params["optim.lr"] for t in study.trials[:4]], [t.params["optim.lr"] for t in study.trials[4:]]
    assert len(set(new)) == 2 and not set(new) & set(old)
    _, runs = mlflow_runs(tmp_path)
    assert len([r for r in runs if r.data.tags.get("optuna_study") == "test"]) == 1  # still one parent
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 6


def test_seeds_expand_into_a_seed_sweep():
    """`seeds=3`: seeds seed..seed+2 for every job; a hand-set seed is the base; a seed swept by hand is kept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from hydra_plugins.avrl_sweepers.basic_sweeper import seed_sweep

    parser = OverridesParser.create()
    config = OmegaConf.create({"seed": 7, "seeds": 3})
    assert seed_sweep(config, parser, ["algorithm=grpo,sft", "seed=7"]) == ["algorithm=grpo,sft", "seed=7,8,9"]
    assert seed_sweep(config, parser, ["seed=1,2"]) == ["seed=1,2"]
    assert seed_sweep(OmegaConf.create({"seed": 7, "seeds": 1}), parser, ["a=1"]) == ["a=1"]
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        seed_sweep(OmegaConf.create({"seed": 7, "seeds": 0}), parser, [])


@pytest.mark.slow
def test_a_quick_search_shorter_than_the_validation_interval_completes(tmp_path):
    """max_steps below trainer.val_check_interval: every trial still returns the final model's val/accuracy (a
    validation runs at the end of training), so the study completes its trials."""
    out = run_cli(
        "-m",
        "search=grpo_optuna",
        "trainer.max_steps=2",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        "data.val_size=4",
        "data.batch_size=2",
        "algorithm.max_completion_length=8",
        "trainer.enable_progress_bar=false",
        "save_final_model=false",
        f"hydra.sweep.dir={tmp_path}/sweep",
        tmp_path=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (study_name,) = optuna.get_all_study_names(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert all(0 <= t.value <= 1 for t in study.trials)


def test_a_study_parent_is_left_running_while_other_workers_have_trials(tmp_path):
    """A worker that ends while another worker's trial runs leaves the study's parent run RUNNING; the last one
    closes it (avrl/sweeps/parent_run.py)."""
    from omegaconf import OmegaConf

    from avrl.sweeps.parent_run import _trials_running

    storage = f"sqlite:///{tmp_path}/optuna.db"
    config = OmegaConf.create({"hydra": {"sweeper": {"storage": storage, "study_name": "s"}}})
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    assert _trials_running(config)
    study.tell(trial, 1.0)
    assert not _trials_running(config)


@pytest.mark.slow
def test_a_trial_failed_by_another_worker_while_it_runs_is_reported_not_told(tmp_path):
    """Another worker's heartbeat check can fail a trial that is still running (its beats came late). The worker
    running it then finds the trial finished: it says why and records no result (Optuna refuses to tell a finished
    trial), instead of crashing. The run is held at a known point while the trial is failed from outside."""
    from tests.support import HANG_GUARD, finish, start_cli
    from tests.support.services import wait_for

    storage, marker, release = f"sqlite:///{tmp_path}/optuna.db", tmp_path / "holding", tmp_path / "go"
    worker = start_cli(
        "-m",
        "search=grpo_optuna",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=late",
        "hydra.sweeper.n_trials=1",
        "trainer.max_steps=2",
        "data.val_size=4",
        "data.batch_size=2",
        "algorithm.max_completion_length=8",
        "trainer.enable_progress_bar=false",
        "save_final_model=false",
        "+callbacks.hold._target_=tests.support.hold.HoldAt",
        f"+callbacks.hold.marker={marker}",
        f"+callbacks.hold.release={release}",
        f"hydra.sweep.dir={tmp_path}/sweep",
        log=tmp_path / "worker.log",
        tmp_path=tmp_path,
    )
    wait_for(lambda: marker.exists() or worker.poll() is not None, "the held trial", limit=HANG_GUARD)
    assert worker.poll() is None, worker.log.read_text()[-3000:]
    store = optuna.storages.RDBStorage(storage)
    (trial,) = store.get_all_trials(store.get_study_id_from_name("late"))
    store.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # what another worker's stale check does
    release.touch()
    console = finish(worker, check=False)
    assert worker.returncode == 1, console[-3000:]  # the only trial of this invocation failed
    assert "trial 0: another worker marked this trial FAIL while it ran" in console
    (row,) = json.loads((tmp_path / "sweep/sweep_summary.json").read_text())["jobs"]
    assert row["status"] == "FAIL" and "heartbeat_interval" in row["error"]
    assert [t.state for t in optuna.load_study(study_name="late", storage=storage).trials] == [TrialState.FAIL]
    _, runs = mlflow_runs(tmp_path)
    (run,) = [r for r in runs if r.data.params.get("trial") == "0"]
    assert run.info.status == "FAILED" and run.data.tags["optuna_state"] == "FAIL"  # the run agrees with the study
