"""The benchmarks (benchmarks/): each one's code path in a `--smoke` run (its timings mean nothing), the GPU
benchmark's batch and memory plan, and docs/measurements.md, which benchmarks/measurements.py generates from their
results."""

import json
import re
import shutil

import pytest
import torch

from avrl.config import ASSETS
from benchmarks import measurements
from tests.support import ROOT, run_cli


@pytest.mark.slow
def test_the_speed_benchmark_smoke_writes_its_figures(tmp_path):
    """`python -m benchmarks.speed --smoke`: one short step of avrl (both prefix paths) and of TRL on both prompt
    shapes, the audio, prefix and scaling rows, and the summary table, as JSON."""
    pytest.importorskip("trl")
    run_cli("--smoke", "--out", str(tmp_path / "bench.json"), module="benchmarks.speed")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["trl"]) == {"short_prompts", "audio_length_prompts"}
    for row in report["trl"].values():
        for framework in ("avrl", "avrl_repeated_prefix", "trl"):
            assert row[framework]["median_step_seconds"] > 0 and row[framework]["peak_memory_mb"] > 0
        assert row["time_ratio_avrl_over_trl"] == pytest.approx(
            row["avrl"]["median_step_seconds"] / row["trl"]["median_step_seconds"]
        )
    long_prompt = report["trl"]["audio_length_prompts"]["avrl"]["prompt_tokens"]
    assert long_prompt > report["trl"]["short_prompts"]["avrl"]["prompt_tokens"]
    assert {"once_per_prompt", "repeated_G_times"} <= set(report["audio"]["rows"][0])
    prefix = report["prefix"]["rows"][0]
    assert prefix["prompt_tokens"] == 790  # 30 s of audio: 750 audio tokens and 40 text tokens
    assert set(prefix["shared_prefix"]["seconds_by_phase"]) == {"rollout", "reference_logps", "update"}
    assert {"shared", "repeated"} <= set(report["scaling"]["rows"][0])
    assert report["summary"].count("\n") == 1 + 2 * 2 + 1 + 1  # header, rule, 4 TRL rows, prefix, scaling
    assert len(measurements.speed_rows(report)) == 2 + 1 + 1 + 1  # the page reads this format: 2 TRL shapes, ...


def test_the_benchmarks_omni_prompt_holds_an_image_block_then_an_audio_block():
    """As avrl's processor orders them, each wrapped in the start/end tokens the Omni rope finds media by; 56 x 56
    pixels are 4 x 4 patches of 14, merged 2 x 2 into 4 image tokens."""
    from transformers import AutoConfig

    from avrl.models import families
    from benchmarks.audio_step import media_batch

    config = AutoConfig.from_pretrained(ASSETS / "tiny_qwen2_5_omni")
    family = families.get("qwen2_5_omni")
    batch = media_batch(config, family, 2, 10.0, torch.device("cpu"), image_side=56)
    ids = batch["input_ids"][0].tolist()
    n_audio = int(family.audio_token_count(torch.tensor(1000)))
    image = [config.vision_start_token_id, *[config.image_token_id] * 4, config.vision_end_token_id]
    audio = [config.audio_start_token_id, *[config.audio_token_id] * n_audio, config.audio_end_token_id]
    assert ids[20 : 20 + len(image) + len(audio)] == image + audio and len(ids) == 40 + len(image) + len(audio)
    assert batch["pixel_values"].shape == (2 * 16, 3 * 2 * 14 * 14)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert batch["feature_attention_mask"].sum(1).tolist() == [1000, 1000]


def test_full_fine_tuning_of_the_7b_fits_no_zero_setup_of_one_141_gb_gpu_with_128_gib_of_host_memory():
    """The memory plan `python -m benchmarks.gpu` prints (DeepSpeed's own estimators): full fine-tuning of the 8.4B
    Qwen2-Audio fits none of ZeRO-2/3 with or without offload on the lent GPU machine (one H200, 128 GiB of host
    memory); with 2 TiB of host memory ZeRO-3 offloading everything fits, leaving a few GiB on the GPU."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    from benchmarks.gpu import full_fine_tuning_plan

    gib = 2**30
    parameters, embeddings = 8_397_094_912, 156032 * 4096
    h200 = full_fine_tuning_plan(parameters, embeddings, gpu_bytes=141 * 10**9, host_bytes=128 * gib)
    assert not any(row["fits_this_machine"] for row in h200["setups"].values()), h200
    assert "fits no ZeRO setup" in h200["verdict"]
    # Adam's fp32 moments and master weights alone are 12 bytes per parameter: offloaded, > 90 GiB of host memory.
    assert h200["setups"]["zero3_offload_all"]["1_gpu"]["host_gib_per_node"] > 12 * parameters / gib
    big_host = full_fine_tuning_plan(parameters, embeddings, gpu_bytes=141 * 10**9, host_bytes=2048 * gib)
    assert big_host["setups"]["zero3_offload_all"]["fits_this_machine"]
    assert big_host["setups"]["zero3_offload_all"]["1_gpu"]["gpu_gib"] < 5
    assert not big_host["setups"]["zero2"]["fits_this_machine"]  # 16 bytes/parameter on the GPU: > 125 GiB


@pytest.mark.slow  # a CLI run in a subprocess: the full suite's
def test_the_gpu_benchmark_code_path_runs_on_cpu_with_smoke_and_refuses_without_a_gpu(tmp_path):
    """`python -m benchmarks.gpu --smoke` runs the same step on the tiny sizes (here on CPU): every phase is timed and
    the projection is written; without --smoke and without CUDA it refuses, saying why."""
    run_cli("--smoke", "--out", str(tmp_path / "gpu.json"), module="benchmarks.gpu")
    report = json.loads((tmp_path / "gpu.json").read_text())
    for shape in ("qwen2_audio_7b", "qwen2_5_omni_7b_thinker"):
        for path in ("shared_prefix", "repeated_prefix"):
            gpu = report[shape][path]
            assert set(gpu["seconds_by_phase"]) == {"rollout", "reference_logps", "update"}
            assert all(s > 0 for s in gpu["seconds_by_phase"].values())
            assert gpu["step_seconds"] == pytest.approx(sum(gpu["seconds_by_phase"].values()))
            assert gpu["gpu_hours_per_1000_steps_on_8_gpus"] == pytest.approx(gpu["step_seconds"] * 8000 / 3600)
        assert set(report["full_fine_tuning"][shape]["setups"]) == {
            "zero2",
            "zero2_offload_optimizer",
            "zero3",
            "zero3_offload_optimizer",
            "zero3_offload_all",
        }
    assert report["qwen2_5_omni_7b_thinker"]["media_per_prompt"] == "10 s of audio and a 56 x 56 image"
    assert len(measurements.gpu_rows(report)) == 2 * 2 + 2  # the page reads this format: shapes x paths, plans
    if not torch.cuda.is_available():
        out = run_cli("--out", str(tmp_path / "no.json"), module="benchmarks.gpu", check=False)
        assert out.returncode != 0 and "needs a CUDA device" in out.stderr


def test_the_measurements_page_is_what_the_script_writes_from_the_results():
    """docs/measurements.md cannot go stale: it is benchmarks/measurements.py's rendering of the JSON results and
    manual.json as they are (after a new result, run `python benchmarks/measurements.py`)."""
    assert (ROOT / "docs/measurements.md").read_text() == measurements.render(), (
        "docs/measurements.md is out of date: run python benchmarks/measurements.py"
    )


def test_every_row_of_the_measurements_page_has_a_date_and_a_command():
    """One row per measured figure, each with its date, its machine, the figure and the command that produced it;
    every benchmark with results has its section."""
    page = (ROOT / "docs/measurements.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| date ")]
    assert len(rows) > 20
    for row in rows:
        date, machine, figure, command = [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), row
        assert machine and figure.startswith("**"), row
        assert re.fullmatch(r"`[^`]+`", command), row
    assert [line[3:] for line in page.splitlines() if line.startswith("## ")] == [
        title for _, title, *_ in measurements.SECTIONS
    ]


def test_the_measurements_page_says_which_results_are_missing_and_refuses_a_smoke_run(tmp_path):
    """A benchmark without results says so on the page; a `--smoke` run's figures (which mean nothing) never reach
    it."""
    for name in ("speed.json", "reliability.json", "suite_under_load.json", "manual.json"):
        shutil.copy(ROOT / "benchmarks" / name, tmp_path / name)
    assert "No figures yet: no run has written `benchmarks/gpu.json`" in measurements.render(tmp_path)
    speed = json.loads((tmp_path / "speed.json").read_text())
    (tmp_path / "speed.json").write_text(json.dumps({**speed, "smoke": True}))
    with pytest.raises(SystemExit, match="--smoke"):
        measurements.render(tmp_path)
