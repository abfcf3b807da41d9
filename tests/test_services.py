"""Scale-out paths against the real services users grow into, started on localhost (support/services.py): an Optuna
study on PostgreSQL shared by several workers, a sweep through a real SLURM cluster, MLflow servers that hold the
runs and serve their artifacts. Marked `services` (and slow): they install PostgreSQL / SLURM with apt-get where
they are missing and skip, saying why, where that cannot be done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from avrl import db
from tests.support import HANG_GUARD, ROOT, finish, mlflow_runs, mlflow_server, run_cli, services, start_cli

# A trial or job of a few seconds: two steps, a small validation, no final controls.
QUICK = [
    "trainer.max_steps=2",
    "data.val_size=4",
    "data.batch_size=2",
    "algorithm.max_completion_length=8",
    "trainer.enable_progress_bar=false",
    "save_final_model=false",
    "final_eval.audio=[]",
    "final_eval.ood=false",
]


@pytest.fixture(scope="module")
def postgres_url():
    with services.postgres() as url:
        yield url


# ------------------------------------------------------------------------------------------------ the driver
def test_a_missing_database_driver_is_named_before_any_job_starts(tmp_path):
    """SQLAlchemy's own message ("Failed to import DB access module") names no package; avrl's names the one to
    install, before the sweep's first job (no job folder is made)."""
    with pytest.raises(db.MissingDriver, match=r"needs the database driver `psycopg2`.*pip install psycopg2-binary"):
        db.require_driver("postgresql+psycopg2://me:secret@db/optuna", "hydra.sweeper.storage")
    with pytest.raises(db.MissingDriver, match=r"mysql://me:\*\*\*@db/x needs the database driver `MySQLdb`"):
        db.require_driver("mysql://me:secret@db/x", "logger.tracking_uri")
    db.require_driver("postgresql://me@db/optuna", "hydra.sweeper.storage")  # psycopg 3: in the postgres extra
    for not_a_database in ("http://127.0.0.1:5000", "mlruns", "file:///tmp/mlruns"):
        db.require_driver(not_a_database, "logger.tracking_uri")

    out = run_cli(
        "-m",
        "search=grpo_optuna",
        "hydra.sweeper.storage=postgresql+psycopg2://me:secret@127.0.0.1:1/x",
        f"hydra.sweep.dir={tmp_path}/sweep",
        tmp_path=tmp_path,
        check=False,
    )
    assert out.returncode == 1
    assert (
        "hydra.sweeper.storage=postgresql+psycopg2://me:***@127.0.0.1:1/x needs the database driver `psycopg2`"
        in out.stderr
    )
    assert "secret" not in out.stdout + out.stderr
    assert not list((tmp_path / "sweep").glob("[0-9]*"))  # no job started


def test_a_sweep_whose_mlflow_server_does_not_answer_starts_no_job(tmp_path):
    """Hydra turns an exception in a multirun callback into a warning and runs the jobs anyway (each then failing,
    or logging outside the sweep); avrl's parent-run callback stops the sweep at once instead, naming the server."""
    url = f"http://127.0.0.1:{services.free_port()}"
    out = run_cli(
        "-m", "algorithm=grpo,sft", f"hydra.sweep.dir={tmp_path}/sweep", env={"MLFLOW_TRACKING_URI": url}, check=False
    )
    assert out.returncode == 1
    assert f"no job was started: MLflow tracking server {url} is unreachable" in out.stderr
    assert not list((tmp_path / "sweep").glob("[0-9]*"))


@pytest.mark.services
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_study_lock_makes_a_second_holder_wait(backend, request, tmp_path):
    """db.lock: while one connection holds the study's lock, another process's attempt waits, and goes on once it
    is released (PostgreSQL advisory lock; a file lock beside an SQLite database)."""
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url") + "/postgres"
    else:
        url = f"sqlite:///{tmp_path}/optuna.db"
    code = "import sys\nfrom avrl import db\nwith db.lock(sys.argv[1], 'study s'): print('got it')"
    waiter = [sys.executable, "-c", code, url]
    with db.lock(url, "study s"):
        other = subprocess.Popen(waiter, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            other.wait(timeout=5)  # still waiting on the lock (a wrong lock lets it through at once)
        with db.lock(url, "study t"):  # another name is another lock
            pass
    assert other.communicate(timeout=HANG_GUARD)[0].strip() == "got it"


# ------------------------------------------------------------------------------------------------ Optuna on PostgreSQL
@pytest.mark.slow
@pytest.mark.services
def test_optuna_workers_share_a_postgresql_study(postgres_url, tmp_path):
    """Two workers started together on one study split its n_trials (each number once, no more than n_trials
    between them); a worker killed mid-trial leaves a trial that the next worker's heartbeat check marks FAIL
    (its MLflow run FAILED too); a third worker resumes the study up to a larger n_trials. MLflow runs on a real
    server backed by the same PostgreSQL: every trial is a child of the study's one parent run."""
    import optuna
    from optuna.trial import TrialState

    storage = services.create_database(postgres_url, "optuna")
    with mlflow_server(tmp_path, backend=services.create_database(postgres_url, "mlflow")) as tracking:
        env = {"MLFLOW_TRACKING_URI": tracking}
        study_args = [
            "-m",
            "search=grpo_optuna",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=shared",
            *QUICK,
        ]
        # Beats every second (stale after 2 s) only for the worker that is killed and the one that checks after it:
        # two live workers with such a short grace could fail each other's trials on a busy machine.
        fast_beats = "hydra.sweeper.heartbeat_interval=1"

        started = time.monotonic()
        workers = {
            name: start_cli(
                *study_args,
                "hydra.sweeper.n_trials=4",
                f"hydra.sweep.dir={tmp_path}/{name}",
                env=env,
                log=tmp_path / f"{name}.log",
            )
            for name in ("a", "b")
        }
        for name, process in workers.items():
            finish(process)
        together_s = time.monotonic() - started
        ran = {
            name: [j["job"] for j in json.loads((tmp_path / name / "sweep_summary.json").read_text())["jobs"]]
            for name in workers
        }
        assert sorted(ran["a"] + ran["b"]) == [0, 1, 2, 3], ran  # each trial once, n_trials is the study's total

        # A worker killed in the middle of trial 4: the trial stays RUNNING until someone checks its heartbeat.
        killed = start_cli(
            *study_args,
            fast_beats,
            "hydra.sweeper.n_trials=5",
            f"hydra.sweep.dir={tmp_path}/killed",
            env=env,
            log=tmp_path / "killed.log",
        )
        store = optuna.storages.RDBStorage(storage)

        def trial_4_has_a_run() -> bool:
            trials = store.get_all_trials(store.get_study_id_from_name("shared"), deepcopy=False)
            assert killed.poll() is None, killed.log.read_text()[-3000:]
            return len(trials) == 5 and "mlflow_run_id" in trials[4].user_attrs

        services.wait_for(trial_4_has_a_run, "trial 4's job", killed.log, limit=HANG_GUARD)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        time.sleep(3)  # > the grace period (2 heartbeat intervals): no heartbeat can come from a dead worker

        finish(
            start_cli(
                *study_args,
                fast_beats,
                "hydra.sweeper.n_trials=6",
                f"hydra.sweep.dir={tmp_path}/c",
                env=env,
                log=tmp_path / "c.log",
            )
        )
        resumed = json.loads((tmp_path / "c" / "sweep_summary.json").read_text())["jobs"]
        assert [j["job"] for j in resumed] == [5] and resumed[0]["status"] == "COMPLETE"

        study = optuna.load_study(study_name="shared", storage=storage)
        assert [t.number for t in study.trials] == list(range(6))
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4 + [TrialState.FAIL, TrialState.COMPLETE]

        client, runs = mlflow_runs(tracking)
        (parent,) = [r for r in runs if r.data.tags.get("optuna_study") == "shared"]
        children = {
            int(r.data.params["trial"]): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        assert sorted(children) == list(range(6)) and len(runs) == 7
        assert parent.info.status == "FINISHED"  # closed by the last worker to end, none of its trials running
        assert children[4].info.status == "FAILED" and children[4].data.tags["optuna_state"] == "FAIL"
        assert "heartbeats" in children[4].data.tags["optuna_reason"]
        assert all(children[n].info.status == "FINISHED" for n in (0, 1, 2, 3, 5))

        seconds = [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in study.trials
            if t.state == TrialState.COMPLETE
        ]
        print(
            f"\ntwo workers, 4 trials: {together_s:.0f} s in all; trials per worker {ran}; "
            f"{sum(seconds) / len(seconds):.1f} s per trial (mean of {len(seconds)})"
        )


@pytest.mark.slow
@pytest.mark.services
def test_a_trial_outlives_its_database_connections_being_terminated(postgres_url, tmp_path):
    """pg_terminate_backend on every connection of the study's database while a trial's job is held: the worker's
    heartbeats go on (a dead connection is replaced; a failed beat is retried); a second worker that then asks for
    a trial (and so checks for stale ones) does not fail it; released, the trial completes."""
    import optuna
    import psycopg
    from optuna.trial import TrialState

    storage = services.create_database(postgres_url, "blip")
    marker, release = tmp_path / "held", tmp_path / "go"
    study_args = [
        "-m",
        "search=grpo_optuna",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=blip",
        "hydra.sweeper.heartbeat_interval=1",
        *QUICK,
    ]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}
    first = start_cli(
        *study_args,
        "hydra.sweeper.n_trials=1",
        f"hydra.sweep.dir={tmp_path}/first",
        "+callbacks.hold._target_=tests.support.hold.HoldAt",
        f"+callbacks.hold.marker={marker}",
        f"+callbacks.hold.release={release}",
        env=env,
        log=tmp_path / "first.log",
    )
    services.wait_for(
        lambda: marker.exists() or first.poll() is not None, "the held trial", first.log, limit=HANG_GUARD
    )
    with psycopg.connect(f"{postgres_url}/postgres", autocommit=True) as connection:
        terminated, at = connection.execute(
            "SELECT count(pg_terminate_backend(pid)), now() FROM pg_stat_activity "
            "WHERE datname = 'blip' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert terminated >= 1

    def beating_again() -> bool:  # a heartbeat recorded after the connections were terminated
        assert first.poll() is None, first.log.read_text()[-3000:]
        with psycopg.connect(storage, autocommit=True) as connection:
            (last,) = connection.execute("SELECT max(heartbeat) FROM trial_heartbeats").fetchone()
        return last is not None and last.replace(tzinfo=None) > at.replace(tzinfo=None)

    services.wait_for(beating_again, "a heartbeat after the blip", first.log, limit=HANG_GUARD)
    finish(
        start_cli(
            *study_args,
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={tmp_path}/second",
            env=env,
            log=tmp_path / "second.log",
        )
    )
    release.touch()
    finish(first)
    study = optuna.load_study(study_name="blip", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]


# ------------------------------------------------------------------------------------------------ SLURM
@pytest.mark.slow
@pytest.mark.services
def test_a_sweep_through_a_real_slurm_cluster(tmp_path):
    """`hydra/launcher=slurm` on a single-node slurmctld: each job is a SLURM job that ends COMPLETED, each run a
    child of the sweep's parent on an MLflow server, with what SLURM allocated on it (slurm.* tags, from SLURM_* in
    the job) equal to what the preset asked; one job that raises gives the failing-job summary and a non-zero
    exit, the other's result still comes back. A second sweep runs each job as 2 tasks: DDP across SLURM tasks; a third
    is an Optuna study whose trials are SLURM jobs."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed here")
    with services.slurm() as (slurm_env, cluster), mlflow_server(tmp_path) as tracking:
        env = {**slurm_env, "MLFLOW_TRACKING_URI": tracking}
        launcher = [
            "hydra/launcher=slurm",
            "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=4",
            "hydra.launcher.timeout_min=60",
        ]
        out = start_cli(
            "-m",
            *launcher,
            "hydra.launcher.tasks_per_node=1",
            "algorithm.loss_type=no_such_loss,grpo",
            *QUICK,
            f"hydra.sweep.dir={tmp_path}/sweep",
            env=env,
            log=tmp_path / "sweep.log",
        )
        console = finish(out, check=False)
        assert out.returncode == 1, console[-4000:]
        assert "1 of 2 jobs failed" in console and "sweep summary: 1 of 2 jobs completed" in console
        # This cluster has no accounting (no slurmdbd): submitit's sacct warning, if any, is said once, explained
        # (avrl's launcher follows the jobs through squeue and their result files, so submitit rarely asks sacct).
        assert console.count("SLURM accounting is off on this cluster") <= 1 and "Bypassing sacct" not in console
        assert "submitit WARNING" not in console and "srun` command is available" not in console
        summary = json.loads((tmp_path / "sweep/sweep_summary.json").read_text())
        assert [j["status"] for j in summary["jobs"]] == ["FAILED", "COMPLETED"]
        assert "no_such_loss" in summary["jobs"][0]["error"] and summary["jobs"][1]["value"] is not None

        client, runs = mlflow_runs(tracking)
        (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
        children = {
            r.data.params["algorithm.loss_type"]: r
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        assert children["no_such_loss"].info.status == "FAILED" and children["grpo"].info.status == "FINISHED"
        assert parent.info.status == "FAILED"
        for run in children.values():
            tags = run.data.tags
            assert services.job_state(cluster, tags["slurm.job_id"]) == "COMPLETED"  # the Hydra job inside raised
            assert (tags["slurm.nnodes"], tags["slurm.ntasks"], tags["slurm.cpus_per_task"]) == ("1", "1", "1")
            assert "slurm.gpus_on_node" not in tags  # gpus_per_node=0: no GPU asked for, none given

        # One task per device: 2 tasks per node -> trainer.devices=2, a DDP job whose ranks are SLURM's tasks.
        finish(
            start_cli(
                "-m",
                *launcher,
                "hydra.launcher.tasks_per_node=2",
                "trainer.devices=2",
                "trainer.strategy=ddp",
                "algorithm=grpo,sft",
                *QUICK,
                f"hydra.sweep.dir={tmp_path}/ddp",
                env=env,
                log=tmp_path / "ddp.log",
            )
        )
        _, runs = mlflow_runs(tracking)
        (parent,) = [r for r in runs if r.data.tags.get("sweep_dir") == f"{tmp_path}/ddp"]
        ddp = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(ddp) == 2  # rank 0 alone owns the run (tasks that did not join one DDP group would make 4)
        for run in ddp:
            tags = run.data.tags
            assert (tags["slurm.ntasks"], tags["slurm.ntasks_per_node"]) == ("2", "2")
            assert services.job_state(cluster, tags["slurm.job_id"]) == "COMPLETED"
            assert run.data.params["trainer.devices"] == "2"

        # An Optuna study whose trials are SLURM jobs: the sweeper asks, SLURM runs, the value comes back.
        import optuna

        storage = f"sqlite:///{tmp_path}/optuna.db"
        finish(
            start_cli(
                "-m",
                *launcher,
                "hydra.launcher.tasks_per_node=1",
                "search=grpo_optuna",
                f"hydra.sweeper.storage={storage}",
                "hydra.sweeper.study_name=on_slurm",
                "hydra.sweeper.n_trials=2",
                *QUICK,
                f"hydra.sweep.dir={tmp_path}/study",
                env=env,
                log=tmp_path / "study.log",
            )
        )
        study = optuna.load_study(study_name="on_slurm", storage=storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        _, runs = mlflow_runs(tracking)
        trial_runs = [r for r in runs if r.data.params.get("trial") in ("0", "1") and "slurm.job_id" in r.data.tags]
        assert len({r.data.tags["slurm.job_id"] for r in trial_runs}) == 2  # one SLURM job per trial
