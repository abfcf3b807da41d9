"""The console of `python run.py` (avrl/console.py): the libraries' noise dropped, the lines a user reads kept."""

import pytest

from tests.support import run_cli

# What avrl/console.py drops, as each appears on the console.
NOISE = (
    "Loading weights",  # transformers' from_pretrained bar: the policy and the reference model
    "Writing model shards",  # transformers' save_pretrained bar: the final model
    "FLOPs",  # Lightning's model summary: a column of 0 and "Total FLOPs: 0"
    "built successfully",  # DeepSpeed's "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
)


def assert_no_noise(console: str) -> None:
    for noise in NOISE:
        assert noise not in console, f"{noise!r} on the console:\n{console[-4000:]}"


def test_model_summary_keeps_the_parameter_counts_without_flops(capsys):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.utilities.model_summary import summarize

    from avrl import console

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)

    summary = summarize(Module())
    data = summary._get_summary_data()
    assert "FLOPs" in dict(data)  # what Lightning hands the callback
    console.model_summary().summarize(
        data,
        summary.total_parameters,
        summary.trainable_parameters,
        summary.model_size,
        summary.total_training_modes,
        total_flops=0,
    )
    out = capsys.readouterr().out
    assert "FLOPs" not in out
    for line in ("layer", "Linear", "Trainable params: 15", "Total params: 15", "Modules in train mode"):
        assert line in out, out


@pytest.mark.slow
def test_short_default_run_prints_no_library_noise(tmp_path):
    """`python run.py` for two steps: none of the noise, and the lines a user reads: the parameter summary, the
    validations, the training bar with val/accuracy, where outputs went, the MLflow run."""
    out = run_cli(
        f"hydra.run.dir={tmp_path}/out", "trainer.max_steps=2", "trainer.val_check_interval=2", tmp_path=tmp_path
    )
    console = out.stdout + out.stderr
    assert_no_noise(console)
    for line in (
        "Total params:",
        "step 0: accuracy=",
        "step 2: accuracy=",
        "val/accuracy:",
        "outputs: ",
        "saved the trained model to",
        "MLflow: run ",
    ):
        assert line in console, f"{line!r} missing:\n{console[-4000:]}"


@pytest.mark.slow
def test_deepspeed_run_prints_no_build_message(tmp_path):
    """ZeRO-2 in one CPU process: DeepSpeed's communication backend starts (where it printed its op's build)."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    out = run_cli(
        f"hydra.run.dir={tmp_path}/out",
        "trainer=deepspeed_zero2",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.precision=32-true",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "data.val_size=4",
        "data.batch_size=2",
        "algorithm.num_generations=4",
        "algorithm.max_completion_length=8",
        "logger=none",
        "final_eval.audio=[]",
        "final_eval.ood=false",
        "save_final_model=false",
        tmp_path=tmp_path,
    )
    console = out.stdout + out.stderr
    assert_no_noise(console)
    assert "initializing deepspeed distributed" in console and "step 1: accuracy=" in console, console[-4000:]
