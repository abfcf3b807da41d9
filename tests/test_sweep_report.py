"""The sweep report and the sweep's runs as the MLflow UI shows them, on runs written straight into a SQLite store
(fast): one FINISHED run per arm and seed, the others listed apart; the arm table on the parent run as metrics;
one line per arm with a band in the plots; the Optuna study's best so far; run names that tell the runs apart."""

import math
from types import SimpleNamespace

import mlflow
import pytest
from omegaconf import OmegaConf
from PIL import Image
from scipy.stats import t

from avrl import tracking
from avrl.sweeps import report
from avrl.sweeps.parent_run import run_url, sweep_name
from avrl.tracking import PARENT_RUN_FILE


def interval(values):
    """Mean and 95% t-interval bounds, computed here from the textbook formula."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@pytest.fixture
def sweep(tmp_path):
    """A finished sweep of two arms and two seeds, with what a real one collects besides: a failed first attempt of
    one cell and its re-run, an older FINISHED run of a cell run twice, a killed run and one still running."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.create_experiment("avrl")
    parent = client.create_run(experiment, run_name="sweep", tags={"sweep": "true"}).info.run_id
    clock = iter(range(1_000_000, 2_000_000, 1000))
    made = {}

    def run(arm, seed, status, curve, name=None, **metrics):
        method, prompt = arm.split(" · ")
        tags = {"mlflow.parentRunId": parent, "arm": arm, "seed": str(seed), "algorithm": method, "prompt": prompt}
        name = name or f"{arm} · seed {seed}"
        run_id = client.create_run(experiment, start_time=next(clock), tags=tags, run_name=name).info.run_id
        for step, value in enumerate(curve):
            client.log_metric(run_id, "val/accuracy", value, step=2 * step)
        for key, value in metrics.items():
            client.log_metric(run_id, key.replace("__", "/"), value)
        client.set_terminated(run_id, status)
        made[name] = run_id
        return run_id

    run("grpo · no_think", 1, "FAILED", [0.9], name="grpo failed attempt")
    run("grpo · no_think", 1, "FINISHED", [0.2, 0.6], val_ood__accuracy=0.5)
    run("grpo · no_think", 2, "FINISHED", [0.9, 0.95], name="grpo seed 2 first")  # superseded by the next
    run("grpo · no_think", 2, "FINISHED", [0.4, 0.7], val_ood__accuracy=0.45)
    run("sft · no_think", 1, "FINISHED", [0.3, 0.5], val_ood__accuracy=0.3)
    run("sft · no_think", 2, "FINISHED", [0.3, 0.4], val_ood__accuracy=0.35)
    run("sft · no_think", 3, "KILLED", [0.0])
    run("sft · no_think", 4, "RUNNING", [1.0])
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / PARENT_RUN_FILE).write_text(parent)
    return SimpleNamespace(
        client=client, parent=parent, folder=folder, made=made, uri=f"sqlite:///{tmp_path}/mlruns.db"
    )


def rows(text: str, heading: str) -> list[list[str]]:
    block = text.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_one_finished_run_per_arm_and_seed_the_rest_listed_apart(sweep):
    written = report.write_report(sweep.folder, sweep.uri)
    text = (sweep.folder / "report.md").read_text()
    arms = {row[0]: row for row in rows(text, "(%).")}
    assert sorted(arms) == ["grpo", "sft"]  # the prompt, shared, is cut from the labels
    for arm, finals in (("grpo", [0.6, 0.7]), ("sft", [0.5, 0.4])):  # the newest FINISHED run of each seed only
        mean, low, high = interval(finals)
        assert arms[arm][3] == "2" and arms[arm][4] == f"{100 * mean:.2f} ± {100 * (high - mean):.2f}"
    left = {row[0]: row for row in rows(text, "## Runs left out")}
    assert sorted(left) == [
        "grpo failed attempt",
        "grpo seed 2 first",
        "sft · no_think · seed 3",
        "sft · no_think · seed 4",
    ]
    assert left["grpo failed attempt"][3:] == ["FAILED", "did not finish"]
    assert left["sft · no_think · seed 3"][3:] == ["KILLED", "did not finish"]
    assert left["sft · no_think · seed 4"][3:] == ["RUNNING", "still running"]
    assert left["grpo seed 2 first"][4] == "superseded by grpo · no_think · seed 2 (newer)"
    assert len(rows(text, "## Runs\n")) == 4
    in_report = {r.info.run_name: r.data.tags["in_report"] for r in report.child_runs(sweep.client, sweep.parent)[1]}
    assert sorted(name for name, used in in_report.items() if used == "false") == sorted(left)
    assert sum(used == "true" for used in in_report.values()) == 4
    assert {p.name for p in written} >= {"report.md", "report.json", "val_accuracy.png"}

    # The same numbers on the parent run, as metrics the MLflow UI charts on the collapsed sweep.
    metrics = sweep.client.get_run(sweep.parent).data.metrics
    mean, low, high = interval([0.5, 0.45])
    assert metrics["sweep/val_ood/accuracy/grpo mean"] == pytest.approx(mean)
    assert metrics["sweep/val_ood/accuracy/grpo mean lower95"] == pytest.approx(low)
    assert metrics["sweep/val_ood/accuracy/grpo mean upper95"] == pytest.approx(high)
    assert metrics["sweep/val/accuracy/sft mean"] == pytest.approx(0.45)
    artifacts = {a.path for a in sweep.client.list_artifacts(sweep.parent, "report")}
    assert {"report/report.md", "report/val_accuracy.png"} <= artifacts


def test_plots_draw_one_line_per_arm_with_the_tables_interval(sweep, monkeypatch):
    client = sweep.client
    runs, _ = report.one_run_per_cell(report.child_runs(client, sweep.parent)[1])
    groups = report.arms(runs)
    drawn = {}
    real = report.plt.Axes.fill_between

    def record(ax, x, low, high, **kwargs):  # what the band spans, per step
        drawn[len(drawn)] = (list(x), list(low), list(high))
        return real(ax, x, low, high, **kwargs)

    monkeypatch.setattr(report.plt.Axes, "fill_between", record)
    labels = report.plot(client, groups, "val/accuracy", "accuracy (%)", 100, sweep.folder / "val.png")
    assert labels == ["grpo (2 seeds)", "sft (2 seeds)"]  # one entry per arm, no repeats
    steps, low, high = drawn[0]
    assert steps == [0, 2]
    for i, values in enumerate(([0.2, 0.4], [0.6, 0.7])):  # grpo's kept runs at steps 0 and 2
        _, want_low, want_high = interval(values)
        assert low[i] == pytest.approx(100 * want_low) and high[i] == pytest.approx(100 * want_high)
    with Image.open(sweep.folder / "val.png") as image:
        image.verify()
    assert report.plot(client, groups, "no/such/metric", "", 1, sweep.folder / "none.png") == []
    assert not (sweep.folder / "none.png").exists()


def test_the_study_plot_draws_the_best_trial_so_far(tmp_path):
    def trial(number, state, value):
        return SimpleNamespace(
            data=SimpleNamespace(
                params={"trial": str(number), "objective": "val/accuracy"},
                tags={"optuna_state": state},
                metrics={"val/accuracy": value},
            )
        )

    runs = [
        trial(0, "COMPLETE", 0.3),
        trial(1, "COMPLETE", 0.5),
        trial(2, "PRUNED", 0.9),
        trial(3, "COMPLETE", 0.4),
        trial(4, "FAIL", 0.95),
        trial(5, "COMPLETE", 0.6),
    ]
    best = report.plot_study(runs, "maximize", tmp_path / "study.png")
    assert best == [(0, 30.0), (1, 50.0), (3, 50.0), (5, 60.0)]  # pruned and failed trials are not a best
    assert report.plot_study(runs, "minimize", tmp_path / "min.png")[-1] == (5, 30.0)
    with Image.open(tmp_path / "study.png") as image:
        image.verify()
    assert report.plot_study(runs[2:3], "maximize", tmp_path / "none.png") == []


@pytest.mark.parametrize(
    "params, command_line, want",
    [
        (
            {"algorithm": "grpo,sft,lora"},
            ["sweep=rl_vs_sft", "algorithm=grpo,sft", "seeds=2", "trainer.max_steps=2"],
            [
                "grpo · no_think · seed 42",
                "grpo · no_think · seed 43",
                "sft · no_think · seed 42",
                "sft · no_think · seed 43",
            ],
        ),
        (
            {"reward.weights.format": "0.0,0.5"},
            ["seed=1,2", "model=tiny_qwen2_audio"],
            [
                "grpo · no_think · format=0.0 · seed 1",
                "grpo · no_think · format=0.0 · seed 2",
                "grpo · no_think · format=0.5 · seed 1",
                "grpo · no_think · format=0.5 · seed 2",
            ],
        ),
    ],
)
def test_sweep_runs_are_named_by_what_differs_arm_and_seed(tmp_path, monkeypatch, params, command_line, want):
    """Each job's name: its method and prompt, the overrides the sweep varies (not those every job shares), its
    seed; the arm tag is the name without the seed."""
    OmegaConf.save(
        {"hydra": {"sweeper": {"params": params}, "overrides": {"task": command_line}}}, tmp_path / "multirun.yaml"
    )
    names = []
    for job in range(4):
        if params.get("algorithm"):
            method, value, seed = ["grpo", "sft"][job // 2], None, 42 + job % 2
            task = ["sweep=rl_vs_sft", f"algorithm={method}", "trainer.max_steps=2", f"seed={seed}"]
        else:
            method, value, seed = "grpo", ["0.0", "0.5"][job // 2], 1 + job % 2
            task = ["model=tiny_qwen2_audio", f"reward.weights.format={value}", f"seed={seed}"]
        hydra_cfg = OmegaConf.create({"sweep": {"dir": str(tmp_path)}, "overrides": {"task": task}})
        monkeypatch.setattr(tracking, "hydra_config", lambda c=hydra_cfg: c)
        job = OmegaConf.create({"seed": seed, "trial": None})
        arm, name = tracking.run_label(job, {"algorithm": method, "prompt": "no_think"})
        assert name == f"{arm} · seed {seed}"
        names.append(name)
    assert names == want
    assert max(map(len, names)) <= 40  # the UI's name column


def test_a_name_without_the_sweeps_file_holds_every_override(tmp_path, monkeypatch):
    """An override with an interpolation only the job resolves is read as written; without multirun.yaml every
    override but the seed is in the name (long, but never two runs under one name)."""
    task = ["trainer.max_steps=2", r"+callbacks.hold.marker=/tmp/held-$\{seed\}", "seed=1"]  # as Hydra escapes it
    monkeypatch.setattr(
        tracking,
        "hydra_config",
        lambda: OmegaConf.create({"sweep": {"dir": str(tmp_path)}, "overrides": {"task": task}}),
    )
    cfg, tags = OmegaConf.create({"seed": 1, "trial": None}), {"algorithm": "grpo", "prompt": "no_think"}
    assert tracking.run_label(cfg, tags)[1] == r"grpo · no_think · max_steps=2 · marker=/tmp/held-$\{seed\} · seed 1"
    sweep_line = ["trainer.max_steps=2", "+callbacks.hold.marker=/tmp/held-${seed}", "seed=1,2"]  # multirun.yaml's
    OmegaConf.save(
        {"hydra": {"sweeper": {"params": None}, "overrides": {"task": sweep_line}}}, tmp_path / "multirun.yaml"
    )
    assert tracking.run_label(cfg, tags)[1] == "grpo · no_think · seed 1"


def test_the_parent_is_named_by_its_preset_and_what_the_command_line_sweeps():
    assert (
        sweep_name(["sweep=rl_vs_sft", "algorithm=grpo,sft", "seeds=2", "trainer.max_steps=2"])
        == "sweep rl_vs_sft · algorithm=grpo,sft · seeds=2"
    )
    assert sweep_name(["seeds=1", "seed=1,2", "data.val_size=4"]) == "sweep seed=1,2"


def test_a_local_store_points_at_mlflow_ui_and_a_server_at_itself():
    assert run_url("http://host:5000/", "3", "abc") == "http://host:5000/#/experiments/3/runs/abc"
    assert run_url("sqlite:////tmp/m.db", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
