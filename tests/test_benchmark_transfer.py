"""The transfer table: a training run's final model scored on benchmarks by their official rules
(final_eval.benchmarks), and the sweep report's column per benchmark (mean and 95% interval over seeds per arm)."""

import json
import math
from types import SimpleNamespace

import pytest
from scipy.stats import t

from avrl.sweeps import report
from avrl.train import train
from tests.support import mlflow_runs
from tests.support.helpers import mmau_reference
from tests.test_evaluation import mmsu_reference, stand_in


def test_final_eval_scores_the_trained_model_on_benchmarks_by_their_official_rules(cfg_factory, tmp_path):
    paths = {name: stand_in(tmp_path, name)[0] for name in ("mmar", "mmsu")}
    metrics = train(cfg_factory("data.val_size=4", "data.batch_size=2", "algorithm.num_generations=2",
                                "algorithm.max_completion_length=8", "trainer.max_steps=1",
                                "trainer.enable_progress_bar=false", "final_eval.benchmarks=[mmar,mmsu]",
                                f"+eval.data.mmar.test_path={paths['mmar']}",
                                f"+eval.data.mmsu.test_path={paths['mmsu']}"))  # fmt: skip
    mmar = json.loads((tmp_path / "out/final_eval/mmar/predictions.json").read_text())
    official = sum(mmau_reference(r["answer_prediction"], r["answer"], r["choices"]) for r in mmar) / len(mmar)
    assert len(mmar) == 6 and metrics["eval/mmar/accuracy"] == pytest.approx(official)
    lines = (tmp_path / "out/final_eval/mmsu/predictions.jsonl").read_text().splitlines()
    assert metrics["eval/mmsu/accuracy"] == pytest.approx(mmsu_reference([json.loads(x) for x in lines])[0])
    client, (run,) = mlflow_runs(tmp_path)
    assert run.data.metrics["eval/mmar/accuracy"] == pytest.approx(official)  # what the sweep report reads
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "final_eval/mmsu")}
    assert logged == {"final_eval/mmsu/predictions.json", "final_eval/mmsu/predictions.jsonl"}
    per_item = json.loads((tmp_path / "out/final_eval.json").read_text())
    assert sorted(per_item["eval/mmar"]) == sorted(r["id"] for r in mmar)


def fake_run(arm, seed, **metrics):
    method, prompt = arm.split(" · ")
    tags = {"arm": arm, "seed": str(seed), "algorithm": method, "prompt": prompt}
    return SimpleNamespace(data=SimpleNamespace(metrics={k.replace("__", "/"): v for k, v in metrics.items()},
                                                tags=tags, params={}))  # fmt: skip


def test_the_report_has_a_column_per_benchmark_with_its_interval_over_seeds():
    values = {"grpo · think": ([0.5, 0.6, 0.7], [0.30, 0.40, 0.41]), "sft · think": ([0.4, 0.45, 0.5], [0.2, 0.3, 0.2])}
    runs = [
        fake_run(
            arm,
            s,
            val__accuracy=0.5,
            eval__mmar__accuracy=mmar[s],
            eval__mmau_pro__string_rule__accuracy=pro[s],
            eval__mmar__protocol__accuracy=0.0,
        )  # fmt: skip
        for arm, (mmar, pro) in values.items()
        for s in range(3)
    ]
    table = report.arm_table(report.arms(runs)).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[-2:] == ["mmar", "mmau_pro (string rule, not official)"]  # the protocol's figure is no column
    for line, (mmar, pro) in zip(table[2:], values.values()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        for cell, seeds in zip(cells[-2:], (mmar, pro)):
            n, mean = len(seeds), sum(seeds) / len(seeds)
            half = t.ppf(0.975, n - 1) * math.sqrt(sum((v - mean) ** 2 for v in seeds) / (n - 1)) / math.sqrt(n)
            assert cell == f"{100 * mean:.2f} ± {100 * half:.2f}"
    parent = report.parent_metrics(report.arms(runs))
    assert parent["sweep/eval/mmar/accuracy/grpo mean"] == pytest.approx(0.6)
