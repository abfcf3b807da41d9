"""Exact resume: a run killed with SIGKILL and resumed (ckpt_path=auto, the default) ends where an uninterrupted run
ends."""

from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from avrl.resume import EpochSampler, resolve_ckpt_path, rng_state, set_rng_state
from tests.support import finish, kill_when_held, mlflow_runs, start_cli
from tests.support.deepspeed_checks import check_deepspeed_resume


def test_epoch_sampler_order_depends_on_seed_and_epoch_and_skips_batches():
    sampler = EpochSampler(10, batch_size=3, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and first == list(EpochSampler(10, 3, seed=5))
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    sampler.resume_at = (0, 2)
    assert list(sampler) == first[6:]
    assert list(sampler) == first  # the skip applies once, to the resumed epoch only
    # A checkpoint at epoch 0's last batch: Lightning resumes at the start of epoch 1, which is not cut.
    sampler.resume_at = (0, 3)
    sampler.set_epoch(1)
    fresh = EpochSampler(10, 3, seed=5)
    fresh.set_epoch(1)
    assert list(sampler) == list(fresh)  # epoch 1 whole (the fault: cut by epoch 0's 3 batches, 9 of 10 items gone)


def test_epoch_sampler_splits_an_epoch_over_ranks():
    ranks = [list(EpochSampler(11, 2, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and not set(ranks[0]) & set(ranks[1])


def test_rng_states_round_trip():
    state = rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_ckpt_path_last_names_the_missing_file_and_auto_starts_fresh_or_resumes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*checkpoints/last.ckpt.*hydra.run.dir"):
        resolve_ckpt_path("last", tmp_path)
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("auto", tmp_path) is None  # nothing to resume: a fresh start
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt.prev").write_bytes(b"x")  # a crash between keeping the previous and renaming the new
    assert resolve_ckpt_path("auto", tmp_path) == str(folder / "last.ckpt.prev")
    (folder / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("auto", tmp_path) == str(folder / "last.ckpt")


COMMON = [
    "trainer.max_steps=12",
    "checkpoint_every_n_steps=3",
    "trainer.val_check_interval=4",
    "data.val_size=4",
    "data.batch_size=4",
    "data.train_size=40",
    "algorithm.num_generations=2",
    "algorithm.max_completion_length=8",
    "algorithm.num_iterations=2",
    "algorithm.beta=0.04",
    "trainer.enable_progress_bar=false",
]


def launch(tmp_path, run_dir, *extra, db="mlruns.db"):
    """`python run.py` in the background; its console goes to <run_dir>.log."""
    return start_cli(
        f"hydra.run.dir={run_dir}",
        *COMMON,
        *extra,
        log=Path(f"{run_dir}.log"),
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/{db}"},
    )


def histories(db, run_id):
    """{metric: {step: last value logged at that step}} for every metric but the wall-clock one."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    out = {}
    for key in client.get_run(run_id).data.metrics:
        if key != "train/step_time":
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
            out[key] = {m.step: m.value for m in history}
    return out


def points(db, run_id):
    """{metric: {step: how many values were logged at that step}} for every metric."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    out = {}
    for key in client.get_run(run_id).data.metrics:
        out[key] = {}
        for m in client.get_metric_history(run_id, key):
            out[key][m.step] = out[key].get(m.step, 0) + 1
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 12 steps (2 epochs of 10 batches: a resume crosses an epoch boundary); its folder
    holds ref/ and ref.db."""
    folder = tmp_path_factory.mktemp("reference")
    finish(launch(folder, folder / "ref", db="ref.db"))
    return folder


def assert_same_run(tmp_path, reference, run_dir):
    """`run_dir` ends with the reference's weights, in one MLflow run of tmp_path's store holding the reference's
    metrics, each step once; that run."""
    want = load_file(reference / "ref/final_model/model.safetensors")
    got = load_file(run_dir / "final_model/model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    client, (run_info,) = mlflow_runs(tmp_path)
    assert run_info.info.status == "FINISHED"
    _, (ref_info,) = mlflow_runs(f"sqlite:///{reference}/ref.db")
    expected = histories(reference / "ref.db", ref_info.info.run_id)
    actual = histories(tmp_path / "mlruns.db", run_info.info.run_id)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert expected[key].keys() == actual[key].keys(), key
        for step, value in expected[key].items():
            assert actual[key][step] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, step)
    counts = points(tmp_path / "mlruns.db", run_info.info.run_id)
    assert counts == points(reference / "ref.db", ref_info.info.run_id)
    assert {n for steps in counts.values() for n in steps.values()} == {1}
    return run_info


@pytest.mark.slow
def test_sigkill_torn_checkpoint_and_auto_resume_reach_the_uninterrupted_run(tmp_path, reference):
    """Killed between checkpoints, its last checkpoint then torn in half: the same command again (ckpt_path=auto,
    the default) resumes from the previous checkpoint with a warning naming both files, ends with the uninterrupted
    run's weights, in the same MLflow run, every metric step logged once. Run once more, it trains nothing."""

    # Held (support/hold.py) one batch after its second checkpoint, and SIGKILLed there: it cannot finish before the
    # kill, however the machine schedules the two processes; that batch's metrics are in MLflow, in no checkpoint.
    marker = tmp_path / "holding"
    hold = [
        "+callbacks.hold._target_=tests.support.hold.HoldAfterCheckpoint",
        f"+callbacks.hold.marker={marker}",
        "+callbacks.hold.checkpoints=2",
        "+callbacks.hold.batches_after=1",
    ]
    kill_when_held(launch(tmp_path, tmp_path / "run", *hold), marker)
    assert not (tmp_path / "run/final_model").exists()
    last = tmp_path / "run/checkpoints/last.ckpt"
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    previous = torch.load(f"{last}.prev", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < previous < killed_at < int(marker.read_text()) < 2 * 12  # (num_iterations=2 updates per batch)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn, as by a crash of the machine

    resumed = launch(tmp_path, tmp_path / "run")
    out = finish(resumed, check=False)
    assert resumed.returncode == 0, out[-3000:]
    assert f"checkpoint {last} cannot be read" in out and f"resuming from the previous one, {last}.prev" in out

    run_info = assert_same_run(tmp_path, reference, tmp_path / "run")
    assert run_info.data.tags["resume_count"] == "1"
    client, counts = (
        mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db"),
        points(tmp_path / "mlruns.db", run_info.info.run_id),
    )

    # Finished: the same command once more returns the recorded result and logs nothing.
    again = finish(launch(tmp_path, tmp_path / "run"))
    assert "holds a finished run" in again
    assert points(tmp_path / "mlruns.db", run_info.info.run_id) == counts
    assert client.get_run(run_info.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_signal_stops_the_run_after_a_checkpoint_at_the_next_step_and_it_resumes(tmp_path, reference):
    """SIGUSR1 (SLURM's warning before a time limit; outside SLURM nothing requeues): the step running finishes,
    last.ckpt is saved at it, the run exits (status 1) marked KILLED with the signal; the same command resumes from
    that step and ends as the uninterrupted run, each metric step once."""
    import os
    import signal
    import time

    marker, release = tmp_path / "holding", tmp_path / "release"
    run = launch(
        tmp_path,
        tmp_path / "run",
        "+callbacks.hold._target_=tests.support.hold.HoldAt",
        f"+callbacks.hold.marker={marker}",
        f"+callbacks.hold.release={release}",
        "checkpoint_every_n_steps=100",
    )  # no checkpoint of its own before the signal
    while not marker.exists():
        assert run.poll() is None, finish(run, check=False)[-3000:]
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGUSR1)
    release.touch()
    out = finish(run, check=False)
    assert run.returncode == 1, out[-3000:]
    held_at = int(marker.read_text())
    saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] > held_at  # the step running when the signal came was finished, then saved
    assert "stopped for SIGUSR1 after saving" in out and not (tmp_path / "run/final_model").exists()
    _, (stopped,) = mlflow_runs(tmp_path)
    assert stopped.info.status == "KILLED" and stopped.data.tags["stopped"] == "SIGUSR1"

    finish(launch(tmp_path, tmp_path / "run", "checkpoint_every_n_steps=100"))
    assert assert_same_run(tmp_path, reference, tmp_path / "run").data.tags["resume_count"] == "1"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_resume_reaches_the_uninterrupted_weights(tmp_path, stage):
    """`ckpt_path=last` under DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo); the same on a GPU is in tests/test_gpu.py."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    check_deepspeed_resume(tmp_path, stage, "cpu")


def test_auto_continues_a_folder_only_for_the_same_command(tmp_path, monkeypatch):
    from avrl import resume

    monkeypatch.setattr(resume, "job_overrides", lambda: ["optim.lr=1e-3", "seed=1", "+callbacks.hold.marker=a"])
    resume.save_run_info(tmp_path, "run-1")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/last.ckpt").write_bytes(b"x")
    # Where it logs, how it resumes and test callbacks may change between attempts; the experiment may not.
    monkeypatch.setattr(resume, "job_overrides", lambda: ["seed=1", "optim.lr=1e-3", "logger.tracking_uri=x"])
    assert resume.resolve_ckpt_path("auto", tmp_path) == str(tmp_path / "checkpoints/last.ckpt")
    monkeypatch.setattr(resume, "job_overrides", lambda: ["optim.lr=1e-4", "seed=1"])
    with pytest.raises(
        ValueError,
        match=r"holds a run of another command \(overrides that differ: optim.lr=1e-3 "
        r"optim.lr=1e-4\).*ckpt_path=last",
    ):
        resume.resolve_ckpt_path("auto", tmp_path)
    assert resume.resolve_ckpt_path("last", tmp_path) == str(tmp_path / "checkpoints/last.ckpt")


def test_the_slurm_job_id_is_the_form_scontrol_and_scancel_take(monkeypatch):
    from avrl.preemption import slurm_job_id

    monkeypatch.setenv("SLURM_JOB_ID", "5")
    assert slurm_job_id() == "5"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert slurm_job_id() == "3_1"  # an array task: scancel 5 answers "invalid job id"
