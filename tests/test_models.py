"""Tiny models of every family: config -> processor -> forward pass on a real audio file, offline."""

import numpy as np
import pytest
import torch

from avrl.data.items import QAItem
from avrl.data.media import with_media
from avrl.models import families, load_model, load_processor
from avrl.models import multimodal as mm
from tests.conftest import compose, write_wav


# Audio tokens of a 1 s and a 1.5 s clip (100 mel frames per second): Qwen2-Audio's and Qwen2.5-Omni's rule is
# (frames - 1) // 2 + 1, then (x - 2) // 2 + 1; Qwen3-Omni's is 13 per 100-frame window plus three stride-2 convs
# on the rest (50 -> 25 -> 13 -> 7).
@pytest.mark.parametrize("model_name, audio_tokens", [
    ("tiny_qwen2_audio", [25, 37]), ("tiny_qwen2_5_omni", [25, 37]), ("tiny_qwen3_omni", [13, 20])])
def test_forward_on_real_audio_file_and_encoder_once_matches_transformers(tmp_path, model_name, audio_tokens):
    cfg = compose([f"model={model_name}"])
    model, processor = load_model(cfg.model).eval(), load_processor(cfg.model)
    family = families.get(cfg.model.family)
    omni = cfg.model.images  # the Omni families that avrl feeds images to
    image = None
    if omni:
        from PIL import Image

        image = tmp_path / "a.png"
        Image.fromarray((np.random.default_rng(0).random((56, 56, 3)) * 255).astype("uint8")).save(image)
    items = [QAItem(id=str(i), question=f"Question {i}?", choices=["a", "b"], answer_index=0,
                    audio=str(write_wav(tmp_path / f"{i}.wav", seconds=1.0 + 0.5 * i, freq=300 * (i + 1))),
                    image=str(image) if image else None) for i in range(2)]
    loaded = [with_media(it, processor.sampling_rate, 30) for it in items]
    prompts = [processor.render(it.question, True, omni) for it, _ in loaded]
    batch = processor(prompts, [it.waveform for it, _ in loaded], [im for _, im in loaded] if omni else None)
    n_audio = (batch["input_ids"] == processor.audio_token_id).sum(-1).tolist()
    assert n_audio == audio_tokens
    with torch.no_grad():
        reference = model(**batch).logits
        embeds = mm.embed(model, batch["input_ids"], mm.encode_media(model, family, batch))
        ours = mm.forward_logits(model, family, batch["input_ids"], batch["attention_mask"], embeds, batch)
    valid = batch["attention_mask"].bool()
    assert torch.isfinite(reference).all()
    assert torch.allclose(ours[valid], reference[valid], atol=1e-5)


def test_loader_freezes_audio_encoder_and_sets_hidden_size():
    cfg = compose(["model=tiny_qwen2_5_omni", "model.freeze_audio_encoder=true"])
    model = load_model(cfg.model)
    assert not any(p.requires_grad for p in model.model.audio_tower.parameters())
    assert not any(p.requires_grad for p in model.model.visual.parameters())  # frozen by default
    assert any(p.requires_grad for p in model.model.language_model.parameters())
    assert model.config.hidden_size == model.config.text_config.hidden_size  # for DeepSpeed's "auto" sizes


def test_tiny_builder_round_trip(tmp_path):
    from avrl.models.tiny import build

    path = build(tmp_path / "tiny", "qwen2_audio")
    cfg = compose([f"model.name_or_path={path}"])
    processor = load_processor(cfg.model)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|AUDIO|>") != tok.unk_token_id
    text = processor.render("Is it high?")
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nIs it high?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok(text)["input_ids"]) == text
    assert load_model(cfg.model).config.audio_config.max_source_positions == 100
