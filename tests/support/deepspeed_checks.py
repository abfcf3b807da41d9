"""DeepSpeed checks with one body for two devices: the regular suite runs them on CPU processes (gloo), and
tests/test_gpu.py runs the same bodies on a CUDA GPU (NCCL). Importable on the GPU machine, which has only what the
GPU checks need (no MLflow: these runs use logger=none)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.support import ROOT, assert_same_trained_weights, finish, kill_when_held, start_cli


def nan_on_calls(monkeypatch, calls):
    """Make GRPO's loss NaN on the given (0-based) calls."""
    import avrl.algorithms.grpo as grpo

    real, count = grpo.grpo_loss, {"n": 0}

    def loss(*args, **kwargs):
        value, metrics = real(*args, **kwargs)
        count["n"] += 1
        return (value * float("nan") if count["n"] - 1 in calls else value), metrics

    monkeypatch.setattr(grpo, "grpo_loss", loss)


def check_skipped_update(cfg_factory, monkeypatch, tmp_path, stage: str, accelerator: str) -> None:
    """DeepSpeed accumulates gradients in its own partitions, where setting .grad to None does not reach; the update
    after a skipped (NaN) one must not add the skipped gradients. The weights after a skip are those of the same
    run without DeepSpeed (fp32, one process)."""
    from avrl.train import train

    device = [f"trainer.accelerator={accelerator}", "trainer.devices=1", "trainer.precision=32-true"]
    finals = []
    for name, strategy in (("plain", device), (stage, [f"trainer={stage}", *device])):
        nan_on_calls(monkeypatch, {1})
        cfg = cfg_factory(
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "data.val_size=2",
            "data.batch_size=2",
            "algorithm.num_generations=4",
            "algorithm.max_completion_length=8",
            "algorithm.temperature=1.5",
            "trainer.enable_progress_bar=false",
            "save_final_model=true",
            "logger=none",
            f"output_dir={tmp_path / name}",
            *strategy,
        )
        train(cfg)
        finals.append(load_file(tmp_path / name / "final_model/model.safetensors"))
        monkeypatch.undo()  # the next run wraps the real loss again
    plain, engine = finals
    # A leftover NaN gradient would leave NaNs; one update too few (DeepSpeed dropping it as an overflow) moves
    # every weight by ~lr (1e-3) from the plain run's: both far outside the strategies' float tolerance.
    assert_same_trained_weights(engine, plain)


RESUME_RUN = [
    "trainer.devices=1",
    "trainer.precision=32-true",
    "logger=none",
    "trainer.max_steps=8",
    "trainer.val_check_interval=8",
    "checkpoint_every_n_steps=2",
    "data.val_size=4",
    "data.batch_size=4",
    "data.train_size=40",
    "algorithm.num_generations=2",
    "algorithm.max_completion_length=8",
    "algorithm.num_iterations=2",
    "algorithm.beta=0.04",
    "trainer.enable_progress_bar=false",
]


def check_deepspeed_resume(tmp_path, stage: str, accelerator: str) -> None:
    """`ckpt_path=last` under DeepSpeed (last.ckpt is the engine's checkpoint folder: partitioned weights and
    optimizer states, Lightning's state beside them): a run killed after a checkpoint and resumed ends with the
    uninterrupted run's weights, and task=eval reads the folder's fp32 masters as the final model's weights."""
    from transformers import Qwen2AudioForConditionalGeneration

    from avrl.evaluation import checkpoint_weights

    def launch(run_dir, *extra):
        return start_cli(
            f"hydra.run.dir={run_dir}",
            f"trainer={stage}",
            f"trainer.accelerator={accelerator}",
            *RESUME_RUN,
            *extra,
            log=Path(f"{run_dir}.log"),
        )

    finish(launch(tmp_path / "ref"))
    marker = tmp_path / "holding"
    run = launch(
        tmp_path / "run",
        "+callbacks.hold._target_=tests.support.hold.HoldAfterCheckpoint",
        f"+callbacks.hold.marker={marker}",
    )
    kill_when_held(run, marker)
    assert (tmp_path / "run/checkpoints/last.ckpt").is_dir() and not (tmp_path / "run/final_model").exists()
    assert 0 < int(marker.read_text()) < 8

    console = finish(launch(tmp_path / "run", "ckpt_path=last"))
    # It went on from the checkpoint (a restart from scratch would end with the same weights), quietly: avrl's
    # sampler resumes mid-epoch, and the folder it writes into is its own.
    assert "Restored all states from the checkpoint" in console
    assert "not resumable" not in console and "exists and is not empty" not in console
    want = load_file(tmp_path / "ref/final_model/model.safetensors")
    got = load_file(tmp_path / "run/final_model/model.safetensors")
    base = load_file(ROOT / "avrl/assets/tiny_qwen2_audio/model.safetensors")
    assert want.keys() == got.keys()
    assert sum(not torch.equal(want[name], base[name]) for name in want) > len(want) // 2
    # CUDA's kernels are not bitwise reproducible run to run (atomic adds): there the strategies' float tolerance,
    # still far below what a lost optimizer state or a repeated batch moves (~lr, 1e-3).
    rtol, atol = (1e-5, 1e-6) if accelerator == "cpu" else (1e-4, 1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)

    saved = checkpoint_weights(tmp_path / "run/checkpoints/last.ckpt")
    final = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "run/final_model").state_dict()
    assert saved.keys() == final.keys()
    for name in final:
        torch.testing.assert_close(saved[name], final[name], rtol=1e-6, atol=1e-7, msg=name)
