"""The sweep report and the sweep's runs as the MLflow UI shows them, on runs written straight into a SQLite store
(fast): one FINISHED run per arm and seed, the others listed apart; the arm table on the parent run as metrics;
one line per arm with a band in the plots; the Optuna study's best so far; run names that tell the runs apart."""

import json
import math
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from scipy.stats import t, ttest_ind

from avrl import tracking
from avrl.sweeps import base_row, parent_run, report
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


# ------------------------------------------------------------------------------- the base row and what training costs
@pytest.fixture
def costs_sweep(tmp_path):
    """Two arms of three seeds with the final evaluation's cost measures, validation histories of the target, the
    KL and a retention benchmark, per-item files; the base row on the parent run (base/<metric>)."""

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.create_experiment("avrl")
    parent = client.create_run(experiment, run_name="sweep", tags={"sweep": "true"}).info.run_id
    clock = iter(range(1_000_000, 2_000_000, 1000))
    items = [f"i{k}" for k in range(8)]

    def child(tags, name, status="FINISHED"):
        tags = {"mlflow.parentRunId": parent, **tags}
        return client.create_run(experiment, start_time=next(clock), tags=tags, run_name=name).info.run_id

    for key, value in {"val/accuracy": 0.5, "eval/synthetic_prior/accuracy": 0.8, "final/pass_at_1": 0.5}.items():
        client.log_metric(parent, f"base/{key}", value, step=0)
    client.set_tag(parent, "base_prompt", "no_think")
    arms = {  # arm: per seed: histories by step of the target, KL, prior accuracy; final KL, OOD, tokens, params share
        "grpo · no_think": [
            ({0: 0.5, 2: 0.9, 4: 1.0}, {2: 0.01, 4: 0.02}, {2: 0.8, 4: 0.78}, (0.02, 0.7, 5, 0.1)),
            ({0: 0.5, 2: 0.7, 4: 0.95}, {2: 0.01, 4: 0.03}, {2: 0.79, 4: 0.75}, (0.03, 0.6, 6, 0.2)),
            ({0: 0.5, 2: 0.6, 4: 0.8}, {2: 0.02, 4: 0.04}, {2: 0.8, 4: 0.8}, (0.04, 0.5, 5, 0.3)),
        ],
        "sft · no_think": [
            ({0: 0.5, 2: 1.0, 4: 1.0}, {2: 0.2, 4: 0.3}, {2: 0.6, 4: 0.55}, (0.3, 0.5, 4, 0.9)),
            ({0: 0.5, 2: 0.95, 4: 1.0}, {2: 0.25, 4: 0.35}, {2: 0.65, 4: 0.5}, (0.35, 0.4, 4, 0.95)),
            ({0: 0.5, 2: 0.92, 4: 1.0}, {2: 0.2, 4: 0.4}, {2: 0.7, 4: 0.6}, (0.4, 0.45, 4, 0.9)),
        ],
    }  # fmt: skip
    rng = np.random.default_rng(0)
    for arm, seeds in arms.items():
        method, prompt = arm.split(" · ")
        for seed, (target, kl, prior, final) in enumerate(seeds):
            out = tmp_path / f"{method}{seed}"
            out.mkdir()
            tags = {"arm": arm, "seed": str(seed), "algorithm": method, "prompt": prompt, "output_dir": str(out)}
            run_id = child(tags, f"{arm} · seed {seed}")
            for step, value in target.items():
                client.log_metric(run_id, "val/accuracy", value, step=step)
            for step, value in kl.items():
                client.log_metric(run_id, "val/kl_k3", value, step=step)
            for step, value in prior.items():
                client.log_metric(run_id, "val_eval/synthetic_prior/accuracy", value, step=step)
            last = max(target)
            kl_end, ood, tokens, share = final
            finals = {
                "final/kl_k3": kl_end,
                "final/kl_k3_se": 0.001,
                "val_ood/accuracy": ood,
                "val_ood_noise/accuracy": ood / 2,
                "val_ood_noise/format": 0.5,
                "final/completion_tokens": tokens,
                "final/params_changed_share": share,
                "final/update_norm": 10 * share,
                "eval/synthetic_prior/accuracy": prior[last],
                "final/pass_at_1": target[last],
                "final/pass_at_4": min(1.0, target[last] + 0.05),
            }
            for key, value in finals.items():
                client.log_metric(run_id, key, value, step=last)
            per_item = {
                "val": {i: float(rng.random() < target[last]) for i in items},
                "eval/synthetic_prior": {i: float(rng.random() < prior[last]) for i in items},
                "pass_at_4": {i: float(rng.random()) for i in items},
            }
            (out / "final_eval.json").write_text(json.dumps(per_item))
            client.set_terminated(run_id, "FINISHED")
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / PARENT_RUN_FILE).write_text(parent)
    return SimpleNamespace(
        client=client, parent=parent, folder=folder, arms=arms, uri=f"sqlite:///{tmp_path}/mlruns.db"
    )


def test_the_report_has_the_base_row_retention_and_what_training_cost(costs_sweep):
    written = report.write_report(costs_sweep.folder, costs_sweep.uri, matched=0.9)
    text = (costs_sweep.folder / "report.md").read_text()
    table = text.split("(%).", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = {
        r[0]: dict(zip(header, r, strict=True))
        for r in ([c.strip() for c in x.strip("|").split("|")] for x in lines[1:])
    }
    assert list(body) == ["grpo", "sft"]  # the base row is never one of an arm's seeds: its own table
    (base,) = rows(text, "## The base model")
    assert dict(zip(header, base, strict=True))["synthetic_prior"] == "80.00" and base[0] == "base (not trained)"
    assert body["grpo"]["seeds"] == "3"
    for column in ("KL(base‖tuned)/token (k3)", "pass@1", "pass@4", "completion tokens", "params changed (%)",
                   "update norm", "retention synthetic_prior (Δ vs base)"):  # fmt: skip
        assert column in header
    assert header[5:8] == ["out-of-distribution", "OOD noise", "OOD noise format"]  # the format rate beside it
    for arm, key in (("grpo", "grpo · no_think"), ("sft", "sft · no_think")):
        seeds = costs_sweep.arms[key]
        change = [seed[2][max(seed[0])] - 0.8 for seed in seeds]  # the final prior accuracy minus the base's
        mean, low, high = interval(change)
        assert body[arm]["retention synthetic_prior (Δ vs base)"] == f"{100 * mean:.2f} ± {100 * (high - mean):.2f}"
        mean, low, high = interval([seed[3][0] for seed in seeds])
        assert body[arm]["KL(base‖tuned)/token (k3)"] == f"{mean:.4f} ± {high - mean:.4f}"
    assert dict(zip(header, base, strict=True))["retention synthetic_prior (Δ vs base)"] == ""

    # Run-level measures: the Welch interval, against scipy's.
    rows_ = {r[0]: r for r in rows(text, "## Run-level measures")}
    kl_a = [s[3][0] for s in costs_sweep.arms["grpo · no_think"]]
    kl_b = [s[3][0] for s in costs_sweep.arms["sft · no_think"]]
    ci = ttest_ind(kl_b, kl_a, equal_var=False).confidence_interval(0.95)
    assert rows_["KL(base‖tuned)/token (k3)"][4] == f"[{ci.low:+.4f}, {ci.high:+.4f}]"
    paired = {r[0] for r in rows(text, "## Paired comparisons")}
    assert paired == {"in-distribution", "retention synthetic_prior", "pass@4"}

    # At matched accuracy (X = 0.9): grpo seeds 0 and 1 reach it at steps 2 and 4, seed 2 never (listed); the KL
    # and retention are read at exactly those steps.
    matched = rows(text, "## At matched accuracy")
    by_arm = {r[0]: r for r in matched}
    assert by_arm["grpo"][1] == "2 of 3" and by_arm["sft"][1] == "3 of 3"
    mean, low, high = interval([0.01, 0.03])
    assert by_arm["grpo"][4] == f"{mean:.4f} ± {high - mean:.4f}"
    mean, low, high = interval([0.8 - 0.8, 0.75 - 0.8])
    assert by_arm["grpo"][5] == f"{100 * mean:.2f} ± {100 * (high - mean):.2f}"
    assert "Never reached X" in text and "grpo · no_think · seed 2 (grpo)" in text

    assert {p.name for p in written} >= {"kl_vs_target.png", "retention_vs_target.png"}
    for name in ("kl_vs_target.png", "retention_vs_target.png"):
        with Image.open(costs_sweep.folder / name) as image:
            image.verify()
    parent = costs_sweep.client.get_run(costs_sweep.parent).data.metrics
    assert parent["sweep/eval/synthetic_prior/accuracy/base"] == pytest.approx(0.8)
    assert parent["sweep/final/kl_k3/grpo mean"] == pytest.approx(0.03)
    assert "## Runs left out" not in text


def test_a_base_row_that_exists_is_not_evaluated_again(costs_sweep, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(base_row, "measure", fail)
    assert base_row.evaluate_base(OmegaConf.create({}), costs_sweep.folder, costs_sweep.uri) is False


def test_a_cluster_sweep_leaves_the_base_row_to_a_machine_with_an_accelerator(tmp_path, monkeypatch, caplog):
    """With the SLURM launcher the multirun ends on the submitting node: no model is loaded there, the warning
    names the command to run elsewhere; with the basic launcher the base row is evaluated."""
    evaluated = []
    monkeypatch.setattr(parent_run, "evaluate_base", lambda config, folder, uri: evaluated.append(folder))
    (tmp_path / PARENT_RUN_FILE).write_text("0123")

    def config(launcher: str):
        return OmegaConf.create(
            {
                "hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": {}, "launcher": {"_target_": launcher}},
                "logger": {"enabled": True, "tracking_uri": "sqlite:///unused.db"},
                "final_eval": {"base_row": True},
            }
        )

    parent_run.write_base_row(config("hydra_plugins.avrl_launchers.slurm_launcher.AvrlSlurmLauncher"))
    assert evaluated == [] and f"python -m avrl.sweeps.base_row {tmp_path}" in caplog.text
    parent_run.write_base_row(config("hydra._internal.core_plugins.basic_launcher.BasicLauncher"))
    assert evaluated == [str(tmp_path)]
