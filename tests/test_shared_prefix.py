"""Shared-prefix GRPO (avrl/models/shared_prefix.py) against the repeated path it replaces: the same sampled tokens,
per-token log-probs and every parameter gradient, for each family's rope (1-D; 3-D with an image; Qwen3's), with a
trainable audio encoder, with LoRA and gradient checkpointing; a GRPO run gives the same weights."""

from pathlib import Path

import numpy as np
import pytest
import torch

from avrl.data.items import QAItem
from avrl.data.media import with_media
from avrl.models import families, load_model, load_processor
from avrl.policy import Policy
from tests.support import ROOT, compose, write_wav

G = 3
SAMPLING = dict(max_new_tokens=12, temperature=1.5, top_p=1.0, top_k=0)


def tiny(model_name: str, tmp_path: Path, *overrides):
    """A tiny model in float32 with its encoders trainable, and a batch of two prompts of different lengths (left
    padding) with 1 s and 1.5 s clips; on the Omni families with images, the first prompt carries an image."""
    cfg = compose([f"model={model_name}", "model.freeze_audio_encoder=false", *overrides])
    model, processor = load_model(cfg.model).float().train(), load_processor(cfg.model)
    image = None
    if cfg.model.images:
        from PIL import Image

        image = tmp_path / "a.png"
        Image.fromarray((np.random.default_rng(0).random((56, 56, 3)) * 255).astype("uint8")).save(image)
    clips = [write_wav(tmp_path / f"{i}.wav", seconds=1 + 0.5 * i, freq=300 + 400 * i) for i in range(2)]
    items = [
        QAItem(
            id=str(i),
            question=f"Question {i}" + " word" * (3 * i) + "?",
            choices=["a", "b"],
            answer_index=0,
            audio=str(clips[i]),
            image=str(image) if image and i == 0 else None,
        )
        for i in range(2)
    ]
    loaded = [with_media(item, processor.sampling_rate, 30) for item in items]
    prompts = [processor.render(item.question, True, item.image is not None) for item, _ in loaded]
    images = [im for _, im in loaded] if cfg.model.images else None
    batch = processor(prompts, [item.waveform for item, _ in loaded], images)
    assert not batch["attention_mask"].bool().all()  # left padding is exercised
    return model, processor, families.get(cfg.model.family), batch


def logps_and_gradients(policy: Policy, batch, ids, mask):
    """Per-token log-probs and every parameter's gradient of a loss that weighs tokens unequally."""
    policy.model.zero_grad()
    logps, _ = policy.completion_logps(batch, policy.encode(batch), ids, mask, G, temperature=1.5)
    weights = torch.linspace(0.5, 1.5, ids.shape[1])
    ((logps * mask * weights).sum() + (logps * mask).pow(2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def assert_same_gradients(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 10
    largest = max(g.abs().max() for g in want.values())
    for name, g in want.items():
        # 1e-4 of the tensor's largest entry: the two paths sum in different orders, and in fp32 that alone moved
        # an entry by up to 1.4e-5 of its tensor's largest (measured; a wrong mask or position moves them by
        # O(1)). Tensors whose gradient is zero in exact arithmetic (attention key biases: softmax ignores a
        # shift) hold rounding noise, compared at 1e-4 of 1e-4 of the largest gradient. (float64 is not an
        # option: Qwen3-Omni's MoE kernel takes no float64.)
        scale = max(float(g.abs().max()), 1e-4 * float(largest))
        assert (got[name] - g).abs().max() <= 1e-4 * scale, name


@pytest.mark.parametrize("model_name", ["tiny_qwen2_audio", "tiny_qwen2_5_omni", "tiny_qwen3_omni"])
def test_tokens_log_probs_and_gradients_equal_the_repeated_path(tmp_path, model_name):
    model, processor, family, batch = tiny(model_name, tmp_path)
    repeated, shared = (Policy(model, processor, family, shared_prefix=s) for s in (False, True))
    keys = list(range(101, 101 + 2 * G))
    with torch.no_grad():
        media = repeated.encode(batch)
    ids, mask = repeated.generate(batch, media, G, SAMPLING, keys=keys)
    # Sampling: the same tokens from the same keyed streams; greedy too.
    assert torch.equal(shared.generate(batch, media, G, SAMPLING, keys=keys)[0], ids)
    assert torch.equal(shared.generate(batch, media, 1, SAMPLING)[0], repeated.generate(batch, media, 1, SAMPLING)[0])
    assert len({tuple(row.tolist()) for row in ids}) > 2  # the groups' completions differ

    want_logps, want_grads = logps_and_gradients(repeated, batch, ids, mask)
    got_logps, got_grads = logps_and_gradients(shared, batch, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got_logps[valid], want_logps[valid], rtol=0, atol=1e-5)
    assert any("audio_tower" in name for name in want_grads)  # gradients reach the audio encoder
    assert_same_gradients(got_grads, want_grads)


def test_lora_with_gradient_checkpointing_and_the_adapter_free_reference(tmp_path):
    """Qwen2.5-Omni (3-D rope) with LoRA adapters on the LM and the audio encoder, gradient checkpointing on; the
    reference log-probs (adapters switched off) match too."""
    from avrl.models.lora import apply_lora

    model, processor, family, batch = tiny("tiny_qwen2_5_omni", tmp_path, "model.gradient_checkpointing=true")
    lora = compose(["algorithm=grpo_lora", "algorithm.lora.include_audio_encoder=true"]).algorithm.lora
    model = apply_lora(model, lora)
    for name, p in model.named_parameters():  # B = 0 at init would leave A's gradient zero: give B values
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.train()
    repeated, shared = (Policy(model, processor, family, shared_prefix=s) for s in (False, True))
    with torch.no_grad():
        ids, mask = repeated.generate(batch, repeated.encode(batch), G, SAMPLING, keys=list(range(2 * G)))
    want_logps, want_grads = logps_and_gradients(repeated, batch, ids, mask)
    got_logps, got_grads = logps_and_gradients(shared, batch, ids, mask)
    assert all("lora_" in name for name in want_grads)
    assert any("audio_tower" in name for name in want_grads)
    torch.testing.assert_close(got_logps[mask.bool()], want_logps[mask.bool()], rtol=0, atol=1e-5)
    assert_same_gradients(got_grads, want_grads)
    with torch.no_grad(), model.disable_adapter():
        ref = [p.completion_logps(batch, p.encode(batch), ids, mask, G)[0] for p in (repeated, shared)]
    torch.testing.assert_close(ref[1][mask.bool()], ref[0][mask.bool()], rtol=0, atol=1e-5)


def test_flash_attention_is_refused_by_name(tmp_path):
    from avrl.models.shared_prefix import packed_attention_mask

    with pytest.raises(ValueError, match="algorithm.shared_prefix=false"):
        packed_attention_mask(torch.ones(1, 4), 2, 3, torch.float32, "flash_attention_2")


def test_grpo_run_gives_the_repeated_paths_weights(tmp_path):
    """Three GRPO steps (KL on, a trainable audio encoder, micro-batches of one group, two updates per rollout):
    the final weights with and without the shared prefix agree, and moved. AdamW's eps is 1e-6 here: at 1e-8 a
    weight whose gradient is ~1e-9 moves by lr * g / (|g| + eps), where fp32 rounding of g (the two paths sum in
    different orders) changes the step by a visible fraction of lr; this test is about the gradients."""
    from safetensors.torch import load_file

    from avrl.train import train

    weights = {}
    for shared in (True, False):
        cfg = compose(
            [
                "logger=none",
                "trainer.max_steps=3",
                "trainer.val_check_interval=3",
                "data.batch_size=2",
                "data.val_size=2",
                "algorithm.num_generations=4",
                "algorithm.max_completion_length=8",
                "algorithm.temperature=1.5",
                "algorithm.beta=0.04",
                "algorithm.micro_batch_prompts=1",
                "algorithm.num_iterations=2",
                "algorithm.validate_at_start=false",
                "optim.eps=1e-6",
                "model.freeze_audio_encoder=false",
                f"algorithm.shared_prefix={str(shared).lower()}",
            ],
            output_dir=str(tmp_path / f"shared_prefix_{shared}"),
        )
        train(cfg)
        weights[shared] = load_file(Path(cfg.output_dir) / "final_model/model.safetensors")
    base = load_file(ROOT / "avrl/assets/tiny_qwen2_audio/model.safetensors")
    moved = [n for n in base if not torch.equal(weights[False][n], base[n])]
    assert any("audio_tower" in n for n in moved) and len(moved) > len(base) // 2
    for name in weights[False]:
        torch.testing.assert_close(weights[True][name], weights[False][name], rtol=1e-4, atol=1e-5, msg=name)
