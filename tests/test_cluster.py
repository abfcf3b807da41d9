"""A sweep on a shared SLURM cluster outlives what happens to its jobs (support/services.py's single-node slurmctld;
every test twice, as clusters have either: without accounting, and with it, slurmdbd on MariaDB): a requeued or
signalled job resumes into the same MLflow run and ends as an uninterrupted run; a cancelled job becomes a row of its
own, the others are collected, and the same command runs only it again. Every wait is for a state (a marker file, a
job's state, a result), never for a length of time."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import finish, mlflow_runs, run_cli, services, start_cli

pytestmark = [pytest.mark.slow, pytest.mark.services]

RUN = [
    "trainer.max_steps=6",
    "checkpoint_every_n_steps=2",
    "trainer.val_check_interval=3",
    "data.val_size=4",
    "data.batch_size=2",
    "data.train_size=20",
    "algorithm.num_generations=2",
    "algorithm.max_completion_length=8",
    "trainer.enable_progress_bar=false",
    "final_eval.audio=[]",
    "final_eval.ood=false",
]
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.mem_gb=4",
    "hydra.launcher.timeout_min=60",
]


@pytest.fixture(scope="module", params=[False, True], ids=["no_accounting", "accounting"])
def cluster(request):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed here")
    with services.slurm(accounting=request.param) as (env, folder):
        yield env, folder, request.param


def squeue(env) -> dict[str, str]:
    """{job id: state} of the jobs in the queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True, check=True)
    return dict(line.split() for line in out.stdout.splitlines())


def accounted_state(env, job_id: str) -> str:
    """The job's state in SLURM accounting (sacct), once slurmdbd has recorded its end."""

    def state() -> str:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    services.wait_for(
        lambda: state().split(" ")[0] not in ("", "PENDING", "RUNNING", "REQUEUED"),
        f"the accounting record of the end of SLURM job {job_id}",
    )
    return state().split(" ")[0]  # "CANCELLED by 0"


def final_state_without_slurmctld(env, job_id: str) -> tuple[str, str]:
    """The launcher's final_state of `job_id` where `scontrol show job` no longer knows it (past MinJobAge)."""
    from hydra_plugins.avrl_launchers import slurm_launcher

    run = subprocess.run

    def forgetful(command, *args, **kwargs):
        if command[:2] == ["scontrol", "show"]:
            return subprocess.CompletedProcess(command, 1, "", "slurm_load_jobs error: Invalid job id specified\n")
        return run(command, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", env["SLURM_CONF"])
        patch.setattr(slurm_launcher.subprocess, "run", forgetful)
        return slurm_launcher.final_state(job_id)


def wait_for_file(path: Path, process) -> None:
    while not path.exists():
        assert process.poll() is None, finish(process, check=False)[-4000:]
        time.sleep(0.2)


def start_once_requeued(env, job_id: str, sweep) -> None:
    """Once the job is back in the queue, PENDING for the BeginTime SLURM gives a requeued job (two minutes), let
    it start at the next second: what the test checks is the resume, not SLURM's delay.

    Not `StartTime=now`: the requeue revoked the first run's job credential on the node at second T (before the
    job showed PENDING), and slurmd refuses every credential of that job created at or before T (whole seconds),
    so a start within the same second fails "Killing non-startable batch JobId=N: Job credential revoked" and the
    job ends FAILED. SLURM's two-minute BeginTime exists to keep clear of it; on a busy machine the test's
    requeue-to-start took under a second and hit it."""
    while squeue(env).get(job_id) != "PENDING":
        assert sweep.poll() is None, finish(sweep, check=False)[-4000:]
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+1"], env=env, check=True)


def points(client, run_id) -> dict[str, dict[int, int]]:
    """{metric: {step: how many values were logged at it}}."""
    out: dict[str, dict[int, int]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            out.setdefault(key, {})[m.step] = out.get(key, {}).get(m.step, 0) + 1
    return out


@pytest.mark.parametrize("interrupt", ["scontrol requeue", "scancel --signal=USR2"])
def test_a_requeued_or_signalled_job_resumes_into_one_run_with_the_uninterrupted_weights(tmp_path, cluster, interrupt):
    """Held at step 3 (between checkpoints), interrupted, released: the job ends COMPLETED after its requeue
    (PENDING for SLURM's BeginTime first) in one MLflow child run, FINISHED, resumed once, every step of every
    metric once, with the weights of the same run without SLURM."""
    env, _, accounting = cluster
    want = load_file(_reference(tmp_path) / "final_model/model.safetensors")
    marker, release = tmp_path / "held", tmp_path / "release"
    sweep = start_cli(
        "-m",
        *LAUNCHER,
        *RUN,
        f"hydra.sweep.dir={tmp_path}/sweep",
        "+callbacks.hold._target_=tests.support.hold.HoldAt",
        f"+callbacks.hold.marker={marker}",
        f"+callbacks.hold.release={release}",
        "+callbacks.hold.step=3",
        env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"},
        log=tmp_path / "sweep.log",
    )
    wait_for_file(marker, sweep)
    (job_id,) = squeue(env)
    subprocess.run([*interrupt.split(), job_id], env=env, check=True, capture_output=True)
    release.touch()
    start_once_requeued(env, job_id, sweep)
    console = finish(sweep)
    assert "sweep summary: 1 of 1 jobs completed" in console, console[-4000:]

    client, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlruns.db")
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED" and child.data.tags["resume_count"] == "1"
    assert child.data.tags["slurm.job_id"] == job_id  # requeued: the same job, in the same folder
    counts = points(client, child.info.run_id)
    assert {n for steps in counts.values() for n in steps.values()} == {1}, counts
    got = load_file(tmp_path / "sweep/0/final_model/model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    if accounting:  # accounting holds the job's last run (its requeue), not the interrupted one
        assert accounted_state(env, job_id) == "COMPLETED"


def _reference(tmp_path: Path) -> Path:
    run_cli(f"hydra.run.dir={tmp_path}/ref", *RUN, "logger=none")
    return tmp_path / "ref"


def test_a_cancelled_job_is_a_row_the_others_are_collected_and_the_same_command_runs_only_it(tmp_path, cluster):
    """Three seeds, the second job scancel-ed while it runs: a summary with 2 COMPLETED rows and 1 CANCELLED, the
    report of the completed runs, no MLflow run left RUNNING; the same command into the same folder submits only
    the cancelled cell, which resumes from its checkpoint, and the report then pools the three seeds."""
    env, _, accounting = cluster
    held = tmp_path / "held"
    command = [
        "-m",
        *LAUNCHER,
        *RUN,
        "seed=1,2,3",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "+callbacks.hold._target_=tests.support.hold.HoldAt",
        f"+callbacks.hold.marker={held}" + "-${seed}",
        f"+callbacks.hold.release={tmp_path}/release" + "-${seed}",
        "+callbacks.hold.step=3",
    ]
    run_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}
    sweep = start_cli(*command, env=run_env, log=tmp_path / "sweep.log")
    wait_for_file(Path(f"{held}-2"), sweep)
    (job_of_seed_2,) = [p.name for p in (tmp_path / "sweep/.submitit").iterdir() if p.name.endswith("_1")]  # %A_%a
    out = subprocess.run(["scancel", job_of_seed_2], env=env, capture_output=True, text=True, check=True)
    assert not out.stderr, out.stderr  # (scancel exits 0 on an id it does not know)
    for seed in (1, 3):
        (tmp_path / f"release-{seed}").touch()
    console = finish(sweep, check=False)
    assert sweep.returncode == 1 and "1 of 3 jobs failed" in console, console[-4000:]
    summary = json.loads((tmp_path / "sweep/sweep_summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["COMPLETED", "CANCELLED", "COMPLETED"]
    assert f"SLURM job {job_of_seed_2} ended CANCELLED" in summary["jobs"][1]["error"]
    assert (tmp_path / "sweep/report.md").exists()
    _, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlruns.db")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert {r.data.params.get("seed"): r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags} == {
        "1": "FINISHED",
        "2": "KILLED",
        "3": "FINISHED",
    }
    if accounting:  # once slurmctld has forgotten the job (MinJobAge), the launcher asks sacct: the same answer
        assert accounted_state(env, job_of_seed_2) == "CANCELLED"
        assert final_state_without_slurmctld(env, job_of_seed_2) == ("CANCELLED", "")

    (tmp_path / "release-2").touch()
    console = finish(start_cli(*command, env=run_env, log=tmp_path / "again.log"))
    assert console.count("finished before, not submitted again") == 2, console[-4000:]
    summary = json.loads((tmp_path / "sweep/sweep_summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["COMPLETED"] * 3
    _, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlruns.db")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.params["seed"] for r in children) == ["1", "2", "3"]  # seed 2 went on in its own run
    assert all(r.info.status == "FINISHED" for r in children)
    report = (tmp_path / "sweep/report.md").read_text()
    assert "| 3 |" in report  # one arm, three seeds
