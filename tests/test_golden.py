"""The GRPO step's pinned values (tests/golden): a 3-step fp32 run on CPU reproduces train/loss, train/kl and
train/reward step by step. The file was written by the code before the issue-14 restructuring and is reproduced
exactly after it; regenerate it only on purpose (`python -m tests.golden --write`)."""

import json

import pytest

from tests import golden


def test_three_grpo_steps_reproduce_the_golden_values(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    want = json.loads(golden.FILE.read_text())
    assert want["overrides"] == golden.OVERRIDES, "the golden run's settings changed: regenerate on purpose"
    got = golden.run(tmp_path)
    assert [row["step"] for row in got] == [1, 2, 3]
    assert want["steps"][1]["train/kl"] > 0.01  # the pins are not all zeros: the KL and the loss move
    for mine, pinned in zip(got, want["steps"], strict=True):
        for key in golden.KEYS:
            # fp32 on CPU; 1e-5 relative absorbs kernel differences between CPUs, far below a sign or scale bug
            assert mine[key] == pytest.approx(pinned[key], rel=1e-5, abs=1e-7), (mine["step"], key)
