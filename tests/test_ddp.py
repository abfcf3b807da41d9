"""DDP on CPU (gloo): two processes with half the prompts each reach the weights of one process with all of them."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

COMMON = ["trainer.max_steps=3", "trainer.val_check_interval=3", "data.val_size=4", "algorithm.num_generations=4",
          "algorithm.max_completion_length=8", "algorithm.beta=0.04", "algorithm.temperature=1.5",
          "algorithm.loss_type=grpo", "trainer.enable_progress_bar=false", "logger=none"]


def run(run_dir, *overrides):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={run_dir}", *COMMON, *overrides], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return load_file(run_dir / "final_model/model.safetensors")


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    one = run(tmp_path / "one", "data.batch_size=4")
    two = run(tmp_path / "two", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "trainer.precision=32-true", "data.batch_size=2")
    assert (tmp_path / "two/train_ddp_process_1.log").exists()  # a second rank really ran
    base = load_file(ROOT / "avrl/assets/tiny_qwen2_audio/model.safetensors")
    moved = [name for name in one if not torch.equal(one[name], base[name])]
    assert len(moved) > len(one) // 2  # three steps changed most weights
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
