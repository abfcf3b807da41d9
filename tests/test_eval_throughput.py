"""benchmarks/eval_throughput.py's code path in a `--smoke` run (its timings mean nothing): every batch size
evaluates every item once, the memory row scores one item with a 3 s clip on the tiny Qwen2.5-Omni (whose encoder takes
the whole clip), and the file says it is a smoke run (docs/measurements.md refuses those)."""

import json

import pytest

from tests.support import run_cli


@pytest.mark.slow  # a CLI run in a subprocess: the full suite's
def test_the_eval_throughput_smoke_writes_its_figures(tmp_path):
    run_cli("--smoke", "--out", str(tmp_path / "throughput.json"), module="benchmarks.eval_throughput")
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["smoke"] is True and [r["batch_size"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["items"] == report["items"] == 4
        assert row["items_per_s"] == row["items"] / row["seconds"]
    (memory,) = report["memory"]
    assert report["memory_model"] == "tiny_qwen2_5_omni" and memory["clip_seconds"] == 3
    assert memory["audio_tokens"] == 75  # 300 mel frames: (300 - 1) // 2 + 1 = 150, then (150 - 2) // 2 + 1
    assert memory["peak_rss_mb"] >= memory["rss_after_load_mb"] > 0
