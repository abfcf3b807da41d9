"""algorithm.prompts_per_step: one global batch on any device count (strategies.per_device_prompts and
apply_global_batch), and the paper presets' global batches."""

import math
import warnings

import pytest

from avrl import strategies
from tests.support import compose

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("total", [1, 7, 8, 16, 17])
@pytest.mark.parametrize("devices", [1, 2, 3, 8, 16])
def test_per_device_prompts_is_the_smallest_share_that_covers_the_step(total, devices):
    per_device = strategies.per_device_prompts(total, devices)
    assert per_device == math.ceil(total / devices)  # the reference: Python's exact rational ceiling
    assert per_device * devices >= total and (per_device - 1) * devices < total and per_device >= 1


def test_per_device_prompts_refuses_nonsense():
    with pytest.raises(ValueError, match="devices"):
        strategies.per_device_prompts(16, 0)
    with pytest.raises(ValueError, match="prompts"):
        strategies.per_device_prompts(0, 2)


def applied(*overrides):
    cfg = compose(list(overrides))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategies.apply_global_batch(cfg)
    return cfg, [str(w.message) for w in caught if "prompts_per_step" in str(w.message)]


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_one_and_several_devices_run_the_same_prompts_per_step(devices):
    cfg, warned = applied(
        "algorithm.prompts_per_step=8", "trainer.accelerator=cpu", f"trainer.devices={devices}", "data.batch_size=3"
    )
    assert cfg.data.batch_size * devices == 8 and not warned


def test_nodes_count_and_an_inexact_split_warns():
    cfg, warned = applied("algorithm.prompts_per_step=16", "trainer.accelerator=cpu", "trainer.devices=3")
    assert cfg.data.batch_size == 6 and len(warned) == 1 and "18 per optimizer step instead of 16" in warned[0]
    cfg, warned = applied(
        "algorithm.prompts_per_step=16", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=4"
    )
    assert cfg.data.batch_size == 2 and not warned


def test_null_keeps_data_batch_size_per_device():
    cfg, warned = applied("trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=3")
    assert cfg.algorithm.prompts_per_step is None and cfg.data.batch_size == 3 and not warned


@pytest.mark.parametrize(
    "experiment, total, on_eight",
    [
        ("r1_aqa", 16, 2),  # xiaomi-research/r1-aqa src/train.py:52-53: 1 x accumulation 2 on 8 GPUs
        ("echoink_r1", 8, 1),  # HarryHsing/EchoInk run_grpo_image_audio_avqa-r1.sh:8,20,21: 8 x 1 x 1
    ],
)
def test_paper_presets_fix_the_global_batch(experiment, total, on_eight):
    base = [f"experiment={experiment}", "trainer.accelerator=gpu"]
    eight, _ = applied(*base, "trainer.devices=8")
    one, _ = applied(*base, "trainer.devices=1")
    assert eight.algorithm.prompts_per_step == total
    assert eight.data.batch_size == on_eight and compose(base).data.batch_size == on_eight  # as written, for 8
    assert one.data.batch_size == total and one.algorithm.micro_batch_prompts == 1  # accumulation over 16 (8)
