"""DDP on CPU (gloo): two processes with half the prompts each reach the weights of one process with all of them."""

import pytest

from tests.support import assert_same_trained_weights, final_weights_of_cli_run
from tests.support.helpers import EQUIVALENCE_RUN

COMMON = [o for o in EQUIVALENCE_RUN if not o.startswith("algorithm.loss_type=")]
TWO_PROCESSES = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def run(run_dir, *overrides):
    return final_weights_of_cli_run(run_dir, *COMMON, *overrides)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    one = run(tmp_path / "one", "algorithm.loss_type=grpo", "data.batch_size=4")
    two = run(tmp_path / "two", "algorithm.loss_type=grpo", *TWO_PROCESSES, "data.batch_size=2")
    assert (tmp_path / "two/train_ddp_process_1.log").exists()  # a second rank really ran
    assert_same_trained_weights(two, one)


@pytest.mark.slow
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_every_loss_type_and_reward_scaling_is_exact_across_ranks(tmp_path, loss_type, scale_rewards):
    """dapo's global token count, bnpo's per-micro-batch means and scale_rewards=batch's global std: 2 ranks x 2
    micro-batches train the weights of 1 process x 4 micro-batches (one prompt each, as TRL's per-device batch 1
    with accumulation)."""
    same = [
        f"algorithm.loss_type={loss_type}",
        f"algorithm.scale_rewards={scale_rewards}",
        "algorithm.micro_batch_prompts=1",
        "data.batch_size=4",
    ]
    one = run(tmp_path / "one", *same)
    two = run(tmp_path / "two", *same, *TWO_PROCESSES, "data.batch_size=2")
    assert (tmp_path / "two/train_ddp_process_1.log").exists()
    assert_same_trained_weights(two, one)
