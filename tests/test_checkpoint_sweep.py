"""Checkpoint sweeps: the weights kept every N steps (avrl/checkpoint_sweep.py) and task=eval over a run folder
(avrl/checkpoint_sweep_eval.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from transformers import GenerationConfig

from avrl.checkpoint_sweep import KeepCheckpoints, write_folder
from avrl.checkpoint_sweep_eval import TEST_SELECTION, Checkpoint, evaluate_sweep, is_run_folder, report, summarize
from avrl.evaluation import evaluate
from avrl.models import load_model, load_processor
from avrl.train import train
from tests.support import ROOT, assert_same_trained_weights, mlflow_runs, run_cli
from tests.support.helpers import EQUIVALENCE_RUN


class CrashAfter(Callback):
    """Raises after the batch that reaches optimizer step `step`: a run that dies mid-training."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"crashed at step {trainer.global_step}")


COMMON = [
    "data.val_size=4",
    "data.test_size=4",
    "data.batch_size=2",
    "algorithm.num_generations=2",
    "algorithm.max_completion_length=8",
    "eval.max_new_tokens=8",
    "optim.warmup_ratio=0",
    "trainer.val_check_interval=2",
    "checkpoint_every_n_steps=2",
    "trainer.enable_progress_bar=false",
]


SAMPLING = {"do_sample": True, "top_k": 20, "top_p": 0.5, "repetition_penalty": 1.1, "eos_token_id": 2}


def sampling_base(tmp_path):
    """The tiny model with sampling settings in its generation_config.json, as an Instruct checkpoint ships them."""
    base = shutil.copytree(ROOT / "avrl/assets/tiny_qwen2_audio", tmp_path / "base")
    (base / "generation_config.json").write_text(json.dumps(SAMPLING))
    return base


def test_a_kept_folder_is_whole_in_the_model_dtype_with_the_base_generation_config(cfg_factory, tmp_path):
    cfg = cfg_factory("model.dtype=bfloat16", f"model.name_or_path={sampling_base(tmp_path)}")
    model = load_model(cfg_factory().model)  # float32, as the fp32 master weights of a bf16 run
    target = tmp_path / "steps/step-000007"
    write_folder(model, load_processor(cfg.model), target, torch.bfloat16, cfg.model)
    assert [p.name for p in target.parent.iterdir()] == ["step-000007"]  # no partial folder left beside it
    loaded = load_model(cfg.model, path=str(target)).state_dict()
    want = model.state_dict()
    assert loaded.keys() == want.keys()
    for name, value in want.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], value.to(torch.bfloat16)), name
    # The base checkpoint's own generation config, not the special-tokens-only one avrl's loaded model holds.
    kept = GenerationConfig.from_pretrained(str(target)).to_diff_dict()
    assert {k: kept.get(k) for k in SAMPLING} == SAMPLING
    assert load_processor(cfg.model, path=str(target)) is not None


def test_a_write_that_fails_leaves_no_folder(cfg_factory, tmp_path):
    cfg = cfg_factory()
    processor = load_processor(cfg.model)

    def full_disk(folder):
        raise OSError(28, "No space left on device")

    processor.save_pretrained = full_disk  # after the weights were written
    with pytest.raises(OSError, match="No space left"):
        write_folder(load_model(cfg.model), processor, tmp_path / "step-000001", torch.float32, cfg.model)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("every", [0, -1, 1.5, "2"])
def test_keep_every_n_steps_must_be_a_positive_integer(every, tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints_every_n_steps"):
        KeepCheckpoints(every, tmp_path, None)


def test_only_a_folder_with_kept_checkpoints_is_a_run_to_sweep(tmp_path):
    assert not is_run_folder(None) and not is_run_folder("auto") and not is_run_folder(tmp_path)
    (tmp_path / "checkpoints/steps").mkdir(parents=True)
    assert is_run_folder(tmp_path) and is_run_folder(str(tmp_path))


@pytest.mark.slow
def test_kept_checkpoints_survive_a_resume_and_the_sweep_scores_each_as_a_plain_eval(cfg_factory, tmp_path, capsys):
    """Kept every 2 steps of a 4-step run that crashes at step 3 and resumes: step 2's folder holds the weights of
    a separate 2-step run and is not rewritten by the resume, step 4's the final model's. task=eval on the run
    folder: one row per checkpoint, each scoring as `task=eval ckpt_path=<its folder>`, one MLflow run with the
    accuracy by step, the three selections, best-on-test labelled as chosen on the test set."""
    common = [*COMMON, f"model.name_or_path={sampling_base(tmp_path)}"]
    train(cfg_factory(*common, "trainer.max_steps=2", "logger=none", f"output_dir={tmp_path}/ref"))
    run = tmp_path / "run"
    keep = [*common, "trainer.max_steps=4", "keep_checkpoints_every_n_steps=2", "logger=none", f"output_dir={run}"]
    crash = ["+callbacks.crash._target_=tests.test_checkpoint_sweep.CrashAfter", "+callbacks.crash.step=3"]
    with pytest.raises(RuntimeError, match="crashed at step 3"):
        train(cfg_factory(*keep, *crash))
    steps = run / "checkpoints/steps"
    assert sorted(p.name for p in steps.iterdir()) == ["index.json", "step-000002"]
    step2 = steps / "step-000002/model.safetensors"
    assert_same_trained_weights(load_file(step2), load_file(tmp_path / "ref/final_model/model.safetensors"))
    written = (step2.stat().st_ino, step2.stat().st_mtime_ns, step2.read_bytes())

    train(cfg_factory(*keep))  # ckpt_path=auto: resumes from last.ckpt at step 2
    assert (step2.stat().st_ino, step2.stat().st_mtime_ns, step2.read_bytes()) == written
    assert sorted(p.name for p in steps.iterdir()) == ["index.json", "step-000002", "step-000004"]
    assert_same_trained_weights(
        load_file(steps / "step-000004/model.safetensors"), load_file(run / "final_model/model.safetensors")
    )
    for folder in (steps / "step-000002", steps / "step-000004", run / "final_model"):  # the base's, as R1-AQA's
        kept = GenerationConfig.from_pretrained(str(folder)).to_diff_dict()
        assert {k: kept.get(k) for k in SAMPLING} == SAMPLING, folder
    index = json.loads((steps / "index.json").read_text())
    assert index["kept"] == {"2": "step-000002", "4": "step-000004"} and index["final_step"] == 4
    assert set(index["val_accuracy"]) == {"2", "4"}

    capsys.readouterr()
    sweep = evaluate_sweep(cfg_factory(*common, "task=eval", f"ckpt_path={run}", f"output_dir={tmp_path}/sweep"))
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "sweep/checkpoints.json").read_text())["checkpoints"]
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("step-000002", 2), ("step-000004", 4), ("final", 4)]
    assert rows[2]["same_as"] == "step-000004"
    folders = [steps / "step-000002", steps / "step-000004", run / "final_model"]
    for row, folder in zip(rows, folders):
        plain = evaluate(
            cfg_factory(*common, "task=eval", f"ckpt_path={folder}", f"output_dir={tmp_path}/plain", "logger=none")
        )
        assert row["metrics"] == plain, row["checkpoint"]
        assert row["accuracy"] == {"synthetic": plain["eval/accuracy"]}
        assert row["val_accuracy"] == index["val_accuracy"][str(row["step"])]

    client, (mlflow_run,) = mlflow_runs(tmp_path)  # the sweep's one run (training logged nothing)
    history = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "eval/accuracy"))
    assert history == [(r["step"], pytest.approx(r["metrics"]["eval/accuracy"])) for r in rows[:2]]

    # The selections, from the rows: ties go to the earliest step.
    def best(key):
        return min(rows, key=lambda r: (-key(r), r["step"]))

    summary = json.loads((tmp_path / "sweep/checkpoints.json").read_text())["summary"]
    assert summary["final"]["synthetic"]["accuracy"] == rows[2]["accuracy"]["synthetic"]
    val_pick = best(lambda r: r["val_accuracy"])
    assert summary["best_on_validation"]["synthetic"]["checkpoint"] == val_pick["checkpoint"]
    test_pick = best(lambda r: r["accuracy"]["synthetic"])
    assert summary["best_on_test"]["synthetic"]["checkpoint"] == test_pick["checkpoint"]
    assert sweep["sweep/best_on_test/synthetic/accuracy"] == test_pick["accuracy"]["synthetic"]
    assert f"best on test: {TEST_SELECTION}" in printed
    assert "| final model |" in printed and "| best on validation (highest val/accuracy) |" in printed


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero3"])
def test_two_ranks_keep_the_gathered_weights_once(tmp_path, strategy):
    """DDP and ZeRO-3 (its partitions gathered by every rank) on two CPU processes: rank 0 writes each kept folder,
    whole, under the usual weight names; the one at the last step holds the final model's weights."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    run_cli(
        f"hydra.run.dir={tmp_path}/run",
        *EQUIVALENCE_RUN,
        f"trainer={strategy}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "data.batch_size=2",
        "keep_checkpoints_every_n_steps=1",
        pythonpath=ROOT / "tests/support/cpu_stubs" if strategy.startswith("deepspeed") else None,
    )
    assert (tmp_path / "run/train_ddp_process_1.log").exists()  # a second rank really ran
    steps = tmp_path / "run/checkpoints/steps"
    assert sorted(p.name for p in steps.iterdir()) == ["index.json", "step-000001", "step-000002", "step-000003"]
    final = load_file(tmp_path / "run/final_model/model.safetensors")
    assert_same_trained_weights(load_file(steps / "step-000003/model.safetensors"), final)
    first = load_file(steps / "step-000001/model.safetensors")
    assert first.keys() == final.keys() and any(not torch.equal(first[k], final[k]) for k in final)


def test_the_three_selections_over_two_benchmarks():
    """Best on validation: one checkpoint for all benchmarks (its val/accuracy; ties to the earliest); best on
    test: each benchmark's own highest; final: the final model's. The table has a column per benchmark."""
    scores = {100: (0.5, 0.40, 0.70), 200: (0.7, 0.60, 0.20), 300: (0.7, 0.55, 0.30), 400: (0.6, 0.50, 0.65)}
    rows = [Checkpoint(f"step-{s:06d}", s, Path("x"), v, {"mmau": a, "mmar": b}) for s, (v, a, b) in scores.items()]
    rows.append(Checkpoint("final", 400, Path("y"), 0.6, dict(rows[-1].accuracy), same_as="step-000400"))
    summary = summarize(rows, ["mmau", "mmar"])
    assert {b: p["step"] for b, p in summary["best_on_validation"].items()} == {"mmau": 200, "mmar": 200}
    assert summary["best_on_validation"]["mmar"]["accuracy"] == 0.20  # step 200's, not the best mmar score
    assert {b: (p["step"], p["accuracy"]) for b, p in summary["best_on_test"].items()} == {
        "mmau": (200, 0.60),
        "mmar": (100, 0.70),
    }
    assert summary["final"]["mmau"]["checkpoint"] == "final" and summary["final"]["mmar"]["accuracy"] == 0.65
    text = report(rows, summary, Path("run"))
    assert "| checkpoint | step | val/accuracy | mmau | mmar |" in text
    assert "| step-000300 | 300 | 70.00 | 55.00 | 30.00 |" in text
    assert "| final (= step-000400) | 400 | 60.00 | 50.00 | 65.00 |" in text
    assert f"| best on test: {TEST_SELECTION} | 60.00 (step 200) | 70.00 (step 100) |" in text


@pytest.mark.slow
def test_a_lora_run_keeps_its_adapters_only(cfg_factory, tmp_path):
    run = tmp_path / "run"
    train(
        cfg_factory(
            *COMMON,
            "algorithm=grpo_lora",
            "algorithm.temperature=1.5",
            "trainer.max_steps=2",
            "keep_checkpoints_every_n_steps=2",
            "logger=none",
            f"output_dir={run}",
        )
    )
    kept = run / "checkpoints/steps/step-000002"
    assert (kept / "adapter_config.json").exists() and not (kept / "model.safetensors").exists()
    got, want = load_file(kept / "adapter_model.safetensors"), load_file(run / "final_model/adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
