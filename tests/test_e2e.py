"""End-to-end runs of the CLI, as a user runs them (slow: minutes)."""

import json
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.support import mlflow_runs, mlflow_server, run_cli


def assert_quiet_console(console: str) -> None:
    """Each log message once, no warning, none of the libraries' tips, a progress bar counted in steps."""
    import re

    # Hydra's "[time][logger][LEVEL] - message" lines and a library handler's bare "INFO: message" ones.
    line = r"^(?:\[[^]]*\]\[[^]]*\]\[\w+\] - |(?:INFO|WARNING): )(.*)$"
    messages = [m.group(1) for m in re.finditer(line, console, re.M)]
    assert len(messages) > 5 and len(messages) == len(set(messages)), messages
    assert not re.search(r"warn", console, re.I), console[-3000:]
    assert "site-packages" not in console, console[-3000:]  # a library's warning prints its file
    for noise in ("litlogger", "Epoch 0/-2", "v_num", "available: False", "Creating initial MLflow"):
        assert noise not in console, noise


def only_run(tmp_path):
    client, (run,) = mlflow_runs(tmp_path)
    return client, run


@pytest.mark.slow
@pytest.mark.parametrize("model", [[], ["model=tiny_qwen3_omni"]], ids=["default", "qwen3_omni"])
def test_default_run_learns_to_listen(tmp_path, model):
    """`python run.py` with no arguments, and the same with the third model family: val/accuracy at the end is well
    above step 0's."""
    out = run_cli(f"hydra.run.dir={tmp_path}/out", *model, tmp_path=tmp_path)
    assert "outputs:" in out.stdout and "MLflow: run" in out.stdout
    assert_quiet_console(out.stdout + out.stderr)
    client, run = only_run(tmp_path)
    history = sorted(client.get_metric_history(run.info.run_id, "val/accuracy"), key=lambda m: m.step)
    first, last = history[0], history[-1]
    assert first.step == 0 and last.step > 0
    # 96 validation items: a gain of 0.2 is more than four standard errors of a binomial proportion near 0.5.
    assert last.value >= first.value + 0.2, [(m.step, m.value) for m in history]
    assert (tmp_path / "out/final_model/model.safetensors").exists()
    assert any(p.name.startswith("best") for p in (tmp_path / "out/checkpoints").iterdir())


@pytest.mark.slow
def test_sft_and_omni_run_through_the_cli(tmp_path):
    run_cli(
        f"hydra.run.dir={tmp_path}/out",
        "algorithm=sft",
        "model=tiny_qwen2_5_omni",
        "prompt=echoink",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "data.val_size=4",
        "data.batch_size=2",
        tmp_path=tmp_path,
    )
    client, run = only_run(tmp_path)
    assert run.data.tags["algorithm"] == "sft" and run.data.tags["model"] == "tiny_qwen2_5_omni"
    assert "train/loss" in run.data.metrics and "val/accuracy" in run.data.metrics


@pytest.mark.slow
def test_two_arm_sweep_with_two_seeds_is_one_parent_and_writes_its_report(tmp_path):
    """`seeds=2` on a two-arm sweep: four children under one parent, each arm's two runs differing only by seed and
    named so, tagged for the MLflow UI's Group by; the report is written when the sweep ends (arms pooled over seeds
    with intervals, paired comparisons, one row per run, the plots), its arm table logged on the parent run, the
    parent's address printed, and rewritten by `python -m avrl.sweeps.report DIR` with no tracking URI given."""
    out = run_cli(
        "-m",
        "sweep=rl_vs_sft",
        "algorithm=grpo,sft",
        "seeds=2",
        "data.ood_size=4",  # the toy world's 384-item splits, cut for a test
        "+eval.data.synthetic_prior.test_size=4",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.val_size=4",
        "data.batch_size=2",
        "algorithm.max_completion_length=10",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={tmp_path}/sweep",
        tmp_path=tmp_path,
    )
    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_arm = {}
    for c in children:
        by_arm.setdefault(c.data.tags["arm"], []).append(c)
    assert sorted(len(v) for v in by_arm.values()) == [2, 2]
    assert all(sorted(int(c.data.params["seed"]) for c in v) == [42, 43] for v in by_arm.values())
    assert sorted(v[0].data.tags["algorithm"] for v in by_arm.values()) == ["grpo", "sft"]
    assert sorted(by_arm) == ["grpo · no_think", "sft · no_think"]
    assert sorted(c.info.run_name for c in children) == [
        "grpo · no_think · seed 42",
        "grpo · no_think · seed 43",
        "sft · no_think · seed 42",
        "sft · no_think · seed 43",
    ]
    for c in children:  # what the UI's Group by offers
        tags = c.data.tags
        assert tags["seed"] == c.data.params["seed"] and tags["method"] == tags["algorithm"]
        assert tags["prompt"] == "no_think" and tags["model"] == "tiny_qwen2_audio_prior"  # the toy world's base
    parent = parents[0]
    assert parent.info.run_name == "sweep rl_vs_sft · algorithm=grpo,sft · seeds=2"
    assert (
        f"MLflow: the sweep's parent run (the comparison; its runs are nested under it): http://127.0.0.1:5000/"
        f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    ) in out.stdout
    assert all("val/accuracy" in c.data.metrics and c.data.tags.get("best_checkpoint") for c in children)
    assert parents[0].info.status == "FINISHED"
    for run in (*parents, *children):  # what decides the numbers, on every run (avrl/versions.py)
        tags = run.data.tags
        assert tags["version.torch"] == metadata.version("torch")
        assert tags["version.python"] == platform.python_version()
        assert (
            tags["version.avrl"].split("-")[0]
            == subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], text=True).strip()
        )

    from scipy.stats import t

    sweep = tmp_path / "sweep"
    for rerun in (False, True):
        if rerun:  # the CLI, without MLFLOW_TRACKING_URI: the sweep recorded where it logged
            (sweep / "report.md").unlink()
            run_cli(
                str(sweep), module="avrl.sweeps.report", env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/nowhere.db"}
            )
        text = (sweep / "report.md").read_text()
        tables = [[line for line in block.splitlines() if line.startswith("| ")][1:] for block in text.split("##")]
        arms, runs_table, environment = tables[0], tables[-2], tables[-1]
        assert f"| transformers | {metadata.version('transformers')} |" in environment, text
        assert len(arms) == 2 and len(runs_table) == 4
        for members in by_arm.values():
            method = members[0].data.tags["algorithm"]
            (row,) = [r for r in arms if r.startswith(f"| {method} | {method} |")]  # the shared prompt cut
            cells = [c.strip() for c in row.strip("|").split("|")]
            values = [m.data.metrics["val/accuracy"] for m in members]
            mean, sd = sum(values) / 2, abs(values[0] - values[1]) / math.sqrt(2)
            half = t.ppf(0.975, 1) * sd / math.sqrt(2)
            assert cells[3] == "2" and cells[4] == f"{100 * mean:.2f} ± {100 * half:.2f}"
            on_parent = client.get_run(parent.info.run_id).data.metrics  # the same numbers, charted by the UI
            assert on_parent[f"sweep/val/accuracy/{method} mean"] == pytest.approx(mean)
            assert on_parent[f"sweep/val/accuracy/{method} mean upper95"] == pytest.approx(mean + half)
        assert "Paired comparisons" in text
    from PIL import Image

    for name in ("val_accuracy.png", "accuracy_reward.png", "completion_length.png"):
        with Image.open(sweep / name) as im:
            im.verify()
            assert im.format == "PNG"
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/report.md", "report/val_accuracy.png", "report/report.json"} <= artifacts


@pytest.mark.slow
def test_an_optuna_study_names_its_trials_and_plots_them(tmp_path):
    """Each trial's run is named by its number (its values are its params); the study's report plots the objective
    by trial and the best so far, the same values as the study holds."""
    import optuna
    from PIL import Image

    storage = f"sqlite:///{tmp_path}/optuna.db"
    run_cli(
        "-m",
        "search=grpo_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        "trainer.max_steps=2",
        "data.val_size=4",
        "data.batch_size=2",
        "algorithm.max_completion_length=8",
        "trainer.enable_progress_bar=false",
        "save_final_model=false",
        f"hydra.sweep.dir={tmp_path}/sweep",
        tmp_path=tmp_path,
    )
    _, runs = mlflow_runs(tmp_path)
    names = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert names == ["trial 0 · grpo · no_think · seed 42", "trial 1 · grpo · no_think · seed 42"]
    (study_name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=study_name, storage=storage).trials
    arms = json.loads((tmp_path / "sweep/report.json").read_text())["arms"]
    assert {arm: stats["val/accuracy"]["mean"] for arm, stats in arms.items()} == pytest.approx(
        {f"trial {t.number}": t.value for t in trials}
    )
    with Image.open(tmp_path / "sweep/optuna_trials.png") as image:
        image.verify()


@pytest.mark.slow
def test_sweep_against_a_real_mlflow_server(tmp_path):
    """A real `mlflow server --serve-artifacts` on 127.0.0.1 with a temporary SQLite store: the runs are read back
    over REST, and their artifacts (the config, a completions table, the report's plots) are uploaded through the
    server into its artifact folder and downloaded back through it."""
    import mlflow
    from PIL import Image

    with mlflow_server(tmp_path) as uri:
        run_cli(
            "-m",
            "algorithm=grpo,sft",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            "data.val_size=2",
            "data.batch_size=2",
            "algorithm.max_completion_length=10",
            "trainer.enable_progress_bar=false",
            "++algorithm.log_completions_every_n_steps=1",
            f"hydra.sweep.dir={tmp_path}/sweep",
            env={"MLFLOW_TRACKING_URI": uri},
        )
        client, runs = mlflow_runs(uri)  # REST
        children = {r.data.tags["algorithm"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
        (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
        assert len(runs) == 3 and sorted(children) == ["grpo", "sft"]
        assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)  # proxied by the server

        def fetch(run, path: str) -> Path:
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path=path, tracking_uri=uri, dst_path=str(tmp_path / "back")
                )
            )

        grpo = children["grpo"]
        config = OmegaConf.load(fetch(grpo, "config.yaml"))
        assert config.algorithm.name == "grpo" and config.trainer.max_steps == 1
        (table,) = [a.path for a in client.list_artifacts(grpo.info.run_id, "completions")]
        rows = json.loads(fetch(grpo, table).read_text())
        assert "completion" in rows["columns"] and len(rows["data"]) > 0
        for name in ("val_accuracy.png", "accuracy_reward.png"):
            with Image.open(fetch(parent, f"report/{name}")) as image:
                image.verify()
                assert image.format == "PNG"
        stored = {p.name for p in (tmp_path / "art").rglob("*") if p.is_file()}
        assert {"config.yaml", "val_accuracy.png", Path(table).name} <= stored  # on the server's side


@pytest.mark.slow
def test_a_failing_sweep_job_leaves_the_others_and_fails_the_sweep(tmp_path):
    """One cell of a multirun raises (a loss type GRPO does not know): the other job still completes, the failed
    job's MLflow run is FAILED with the traceback as error.txt, the sweep prints a summary and exits non-zero."""
    out = run_cli(
        "-m",
        "algorithm.loss_type=no_such_loss,grpo",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "data.val_size=2",
        "data.batch_size=2",
        "algorithm.max_completion_length=8",
        "trainer.enable_progress_bar=false",
        "save_final_model=false",
        f"hydra.sweep.dir={tmp_path}/sweep",
        tmp_path=tmp_path,
        check=False,
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 of 2 jobs failed" in out.stderr
    summary = json.loads((tmp_path / "sweep/sweep_summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["FAILED", "COMPLETED"]
    assert "no_such_loss" in summary["jobs"][0]["error"] and summary["jobs"][1]["value"] is not None
    assert "sweep summary: 1 of 2 jobs completed" in out.stdout
    report = (tmp_path / "sweep/report.md").read_text()  # written for a failed sweep too, the failed run apart
    left_out = report.split("## Runs left out", 1)[1].split("\n## ", 1)[0]
    assert "| FAILED | did not finish |" in left_out and "no_such_loss" in left_out

    client, runs = mlflow_runs(tmp_path)
    by_loss = {r.data.params.get("algorithm.loss_type"): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert by_loss["no_such_loss"].info.status == "FAILED" and by_loss["grpo"].info.status == "FINISHED"
    assert "error.txt" in {a.path for a in client.list_artifacts(by_loss["no_such_loss"].info.run_id)}
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert parent.info.status == "FAILED"
