"""DeepSpeed through avrl: HF-style "auto" values resolved, the clipping norm carried over, and ZeRO-2 and ZeRO-3 on
two CPU processes reaching the weights of one process with the same global batch. FSDP where avrl cannot run it:
refused before anything starts."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from avrl.strategies import bucket_sizes, resolve_auto, text_hidden_size
from tests.support import ROOT, assert_same_trained_weights, final_weights_of_cli_run
from tests.support.helpers import STRATEGY_RUN

PAPER_ZERO3 = ROOT / "conf/deepspeed/echoink_zero3.json"


def test_fsdp_on_one_device_or_on_cpu_is_refused_before_anything_starts(cfg_factory, tmp_path):
    """FSDP on one GPU has nothing to shard and torch's FSDP does not run on CPU: the run stops before any folder,
    MLflow run or model exists, saying what to use instead; on 2 devices it goes on (to build, which warns)."""
    from avrl.strategies import check
    from avrl.train import train

    for overrides, where in (
        (["trainer.devices=1"], "on 1 device"),
        (["trainer.strategy=fsdp", "trainer.devices=1"], "on 1 device"),  # Lightning's name
        (["trainer.accelerator=cpu", "trainer.devices=2"], "on CPU"),
    ):
        cfg = cfg_factory("trainer=fsdp", *overrides)
        with pytest.raises(ValueError, match=f"trainer=fsdp {where}.*trainer=deepspeed_zero3 trainer.devices=1"):
            train(cfg)
    if not torch.cuda.is_available():  # the preset's devices=-1 is every visible GPU: none here
        with pytest.raises(ValueError, match="trainer=fsdp on 0 device"):
            train(cfg_factory("trainer=fsdp"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns.db").exists()
    check(cfg_factory("trainer=fsdp", "trainer.devices=2"))
    check(cfg_factory("trainer=fsdp", "trainer.devices=1", "trainer.num_nodes=2"))
    check(cfg_factory("trainer=fsdp", "trainer.devices=[0,1]"))


def tiny(family, folder):
    return OmegaConf.create({"family": family, "name_or_path": str(ROOT / "avrl/assets" / folder), "revision": None})


def test_hidden_size_comes_from_the_text_config_also_for_omni():
    omni = tiny("qwen2_5_omni", "tiny_qwen2_5_omni")
    raw = json.loads((ROOT / "avrl/assets/tiny_qwen2_5_omni/config.json").read_text())
    assert "hidden_size" not in raw  # the thinker config keeps it only under text_config: EchoInk's manual edit
    assert text_hidden_size(omni) == raw["text_config"]["hidden_size"] == 64
    audio = json.loads((ROOT / "avrl/assets/tiny_qwen2_audio/config.json").read_text())
    assert text_hidden_size(tiny("qwen2_audio", "tiny_qwen2_audio")) == audio["text_config"]["hidden_size"]


def test_the_papers_zero3_config_resolves_as_the_hf_trainer_would():
    raw = json.loads(PAPER_ZERO3.read_text())
    resolved = resolve_auto(raw, hidden_size=3584, max_grad_norm=1.0)
    zero = resolved["zero_optimization"]
    assert zero["reduce_bucket_size"] == 3584 * 3584
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 3584 * 3584)
    assert zero["stage3_param_persistence_threshold"] == 35840
    assert resolved["gradient_clipping"] == 1.0
    # What Lightning fills from the Trainer is left to it; precision blocks come from trainer.precision.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16", "bf16"):
        assert key not in resolved
    assert "auto" not in json.dumps(resolved)
    assert raw["zero_optimization"]["reduce_bucket_size"] == "auto"  # the input is left as it was
    assert bucket_sizes(64)["reduce_bucket_size"] == 4096


def test_auto_values_avrl_cannot_fill_are_named():
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size"):
        resolve_auto({"zero_optimization": {"reduce_bucket_size": "auto"}}, hidden_size=None, max_grad_norm=1.0)
    with pytest.raises(ValueError, match='left "auto".*communication_data_type'):
        resolve_auto({"communication_data_type": "auto"}, hidden_size=8, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="gradient_clipping=0.5 but optim.max_grad_norm=1.0"):
        resolve_auto({"gradient_clipping": 0.5}, hidden_size=8, max_grad_norm=1.0)
    # An optimizer block written for the HF Trainer ("auto" params) gives way to avrl's optim group.
    out = resolve_auto({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, hidden_size=8, max_grad_norm=2.0)
    assert out == {"gradient_clipping": 2.0}


def test_deepspeed_reads_the_resolved_values_where_it_would_drop_or_keep_the_raw_autos():
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    from deepspeed.runtime.config import DeepSpeedConfig

    batch = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    raw = json.loads(PAPER_ZERO3.read_text())
    resolved = DeepSpeedConfig({**resolve_auto(raw, hidden_size=64, max_grad_norm=1.0), **batch})
    assert resolved.zero_optimization_stage == 3 and resolved.gradient_clipping == 1.0
    assert (
        resolved.zero_config.reduce_bucket_size,
        resolved.zero_config.prefetch_bucket_size,
        resolved.zero_config.param_persistence_threshold,
    ) == (4096, int(0.9 * 4096), 640)
    # Unresolved, DeepSpeed silently swaps its own defaults in for the sizes and keeps the string "auto" as the
    # clipping norm (which its engine then compares with a number).
    unresolved = DeepSpeedConfig({**raw, **batch, "train_batch_size": 2})
    assert unresolved.zero_config.reduce_bucket_size != 4096 and unresolved.gradient_clipping == "auto"


def test_the_strategy_gets_the_clipping_norm_and_hidden_size_from_the_run_config(cfg_factory):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    from avrl import strategies

    cfg = cfg_factory(
        "model=tiny_qwen2_5_omni",
        "trainer=deepspeed_zero3",
        f"trainer.strategy.config={PAPER_ZERO3}",
        "optim.max_grad_norm=0.3",
    )
    strategy = strategies.build(OmegaConf.to_container(cfg.trainer.strategy, resolve=True), cfg)
    assert strategy.config["gradient_clipping"] == 0.3
    assert strategy.config["zero_optimization"]["reduce_bucket_size"] == 64 * 64  # the tiny Omni text config's


COMMON = STRATEGY_RUN
CPU_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "data.batch_size=2"]


def run(run_dir, *overrides, stubs=False):
    return final_weights_of_cli_run(
        run_dir, *COMMON, *overrides, pythonpath=ROOT / "tests/support/cpu_stubs" if stubs else None
    )


@pytest.mark.slow
def test_zero2_on_two_cpu_processes_equals_one_process_with_the_same_global_batch(tmp_path):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    # Two micro-batches of one prompt per update as well: without DeepSpeed's accumulation boundary ZeRO-2
    # replaced the first micro-batch's gradients with the second's.
    one = run(tmp_path / "one", "data.batch_size=4", "algorithm.micro_batch_prompts=2")
    two = run(tmp_path / "zero2", "trainer=deepspeed_zero2", *CPU_PROCESSES, "algorithm.micro_batch_prompts=1")
    assert (tmp_path / "zero2/train_ddp_process_1.log").exists()  # a second rank really ran
    assert_same_trained_weights(two, one)


@pytest.mark.slow
def test_zero3_with_the_papers_config_on_two_cpu_processes_equals_one_process(tmp_path):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    from transformers import Qwen2AudioForConditionalGeneration

    # Micro-batches too: ZeRO-3 starts a micro-step in the engine's forward, which the micro-batches inside one
    # Lightning step never call; without starting each by hand it copied the second's gradients over the first's.
    one = run(tmp_path / "one", "data.batch_size=4", "algorithm.micro_batch_prompts=2")
    run(
        tmp_path / "zero3",
        "trainer=deepspeed_zero3",
        f"trainer.strategy.config={PAPER_ZERO3}",
        *CPU_PROCESSES,
        "algorithm.micro_batch_prompts=1",
        stubs=True,
    )
    # The gathered final model is a transformers folder under the usual weight names, with the one-process weights.
    model, info = Qwen2AudioForConditionalGeneration.from_pretrained(
        tmp_path / "zero3/final_model", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    saved = load_file(tmp_path / "zero3/final_model/model.safetensors")
    assert set(saved) == set(one)
    assert_same_trained_weights(saved, one)
