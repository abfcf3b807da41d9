"""DDP on CPU (gloo): two processes with half the prompts each reach the weights of one process with all of them."""

import pytest

from tests.support import assert_same_trained_weights, final_weights_of_cli_run
from tests.support.helpers import EQUIVALENCE_RUN as COMMON


def run(run_dir, *overrides):
    return final_weights_of_cli_run(run_dir, *COMMON, *overrides)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    one = run(tmp_path / "one", "data.batch_size=4")
    two = run(
        tmp_path / "two",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "data.batch_size=2",
    )
    assert (tmp_path / "two/train_ddp_process_1.log").exists()  # a second rank really ran
    assert_same_trained_weights(two, one)
