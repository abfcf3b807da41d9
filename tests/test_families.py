"""The model-family registry, proven by its third family: Qwen3-Omni's thinker trains (GRPO, GRPO on LoRA adapters,
SFT) and evaluates through the same code as Qwen2-Audio and Qwen2.5-Omni, touching only the registry and conf/."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from avrl.models import families
from tests.support import ROOT

COMMON = [
    "model=tiny_qwen3_omni",
    "data.val_size=2",
    "data.test_size=3",
    "data.batch_size=2",
    "algorithm.max_completion_length=8",
    "eval.max_new_tokens=8",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=2",
]


def test_only_the_registry_knows_family_names():
    """No module outside avrl/models/families compares a family's name (the issue's `grep "family =="`): what a
    family does differently is asked of its registry entry, so a new family is one file there."""
    offenders = []
    for path in (ROOT / "avrl").rglob("*.py"):
        if "families" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"family(\.name)?\s*(==|!=|\bin\b)", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_every_registered_family_has_a_tiny_asset_and_a_model_option():
    for name in families.REGISTRY:
        configs = [p.stem for p in (ROOT / "conf/model").glob("tiny_*.yaml")]
        assert any(f"family: {name}" in (ROOT / "conf/model" / f"_{name}.yaml").read_text() for _ in configs)
        assert (ROOT / "avrl/assets" / f"tiny_{name}" / "model.safetensors").exists()


@pytest.mark.parametrize("algorithm", ["grpo", "grpo_lora"])
def test_qwen3_omni_trains_with_grpo_and_evaluates(cfg_factory, tmp_path, algorithm):
    from avrl.evaluation import evaluate
    from avrl.train import train

    train(
        cfg_factory(
            *COMMON,
            f"algorithm={algorithm}",
            "algorithm.num_generations=4",
            "algorithm.temperature=1.5",
            "trainer.max_steps=2",
        )
    )
    final = tmp_path / "out/final_model"
    base = load_file(ROOT / "avrl/assets/tiny_qwen3_omni/model.safetensors")
    if algorithm == "grpo":
        trained = load_file(final / "model.safetensors")
        experts = [n for n in trained if ".mlp.experts." in n]
        assert experts, "the MoE experts are saved"
        assert sum(not torch.equal(trained[n], base[n]) for n in trained) > len(trained) // 2
    else:
        assert (final / "adapter_config.json").exists()
        adapters = load_file(final / "adapter_model.safetensors")
        assert any("lora_B" in n and t.abs().sum() > 0 for n, t in adapters.items())  # B starts at zero

    metrics = evaluate(cfg_factory(*COMMON, f"algorithm={algorithm}", "task=eval", f"ckpt_path={final}"))
    rows = json.loads((tmp_path / "out/predictions.json").read_text())
    assert len(rows) == 3 and all("model_output" in r and "model_raw_output" in r for r in rows)
    assert sum(r["model_output"] == r["answer"] for r in rows) / 3 == pytest.approx(metrics["eval/accuracy"])


def test_qwen3_omni_refuses_images_with_the_reason(cfg_factory):
    from avrl.models import load_model

    cfg = cfg_factory("model=tiny_qwen3_omni", "model.images=true")
    with pytest.raises(ValueError, match="feeds no images to the qwen3_omni family"):
        load_model(cfg.model)


@pytest.mark.parametrize("family", sorted(families.REGISTRY))
def test_a_tiny_random_encoder_hears_the_difference_between_two_tones(family):
    """What experiments/tiny_base.yaml starts from must let the audio through: a 200 Hz and a 2 kHz tone give
    audio features that differ by a sizeable fraction of their norm. Measured: Qwen2-Audio 0.63, Qwen2.5-Omni 0.029,
    Qwen3-Omni 0.42 (2e-4 at transformers' own init, with which GRPO never learned to listen)."""
    import numpy as np

    from avrl.models import multimodal as mm
    from avrl.models.processing import AudioTextProcessor
    from avrl.models.tiny import build_tokenizer
    from avrl.models.tiny_sizes import feature_extractor

    spec = families.get(family)
    tokenizer = build_tokenizer(spec.special_tokens)
    torch.manual_seed(0)
    model, _ = spec.build_tiny(tokenizer)
    processor = AudioTextProcessor(tokenizer, feature_extractor(), None, spec)
    t = np.arange(16000) / 16000
    tones = [(0.3 * np.sin(2 * np.pi * f * t)).astype("float32") for f in (200, 2000)]
    batch = processor([processor.render("Is it high?")] * 2, tones)
    with torch.no_grad():
        features = mm.encode_media(model.eval(), spec, batch)["audio"]
    low, high = features.chunk(2)
    assert ((low - high).norm() / low.norm()).item() > 0.01
