"""MMAU-Pro's items with several clips and long clips, through the collator, the processor and the tiny models of
every family: one audio placeholder per clip, in order, each expanded to its clip's encoder outputs; the Omni
families encode a clip past the feature extractor's window whole, Qwen2-Audio cuts it there."""

import dataclasses

import numpy as np
import pytest
import torch

from avrl.data import audio_controls
from avrl.data.items import QAItem
from avrl.datamodule import PromptCollator
from avrl.models import families, load_model, load_processor
from avrl.models import multimodal as mm
from avrl.policy import Policy, prompt_slice
from avrl.prompts import prompt_spec
from tests.support import compose, write_wav

FAMILIES = ["tiny_qwen2_audio", "tiny_qwen2_5_omni", "tiny_qwen3_omni"]


def setup(model_name, max_audio_seconds=30):
    cfg = compose([f"model={model_name}", f"data.max_audio_seconds={max_audio_seconds}"])
    processor = load_processor(cfg.model)
    collate = PromptCollator(processor, prompt_spec(cfg), cfg.data.max_audio_seconds, for_eval=True)
    return cfg, processor, collate


def audio_runs(ids: torch.Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of `token_id` in one row, in order: one run per clip."""
    runs, length = [], 0
    for token in ids.tolist() + [None]:
        if token == token_id:
            length += 1
        elif length:
            runs, length = runs + [length], 0
    return runs


def reference_logits_match(model, family, batch):
    """transformers' own forward on the batch (its processor's keys) equals avrl's encode-once path."""
    inputs = {k: v for k, v in batch.items() if torch.is_tensor(v) and k != "audio_clips"}
    with torch.no_grad():
        reference = model(**inputs).logits
        embeds = mm.embed(model, batch["input_ids"], mm.encode_media(model, family, batch))
        ours = mm.forward_logits(model, family, batch["input_ids"], batch["attention_mask"], embeds, batch)
    valid = batch["attention_mask"].bool()
    assert torch.allclose(ours[valid], reference[valid], atol=1e-5)


@pytest.mark.parametrize("model_name", FAMILIES)
def test_an_item_with_two_clips_gets_two_placeholders_two_feature_sets_and_generates(tmp_path, model_name):
    cfg, processor, collate = setup(model_name)
    family = families.get(cfg.model.family)
    one = write_wav(tmp_path / "a.wav", seconds=0.5, freq=300)
    two = write_wav(tmp_path / "b.wav", seconds=1.5, freq=900)
    items = [
        QAItem("two", "Which clip is higher?", ["first", "second"], 1, audio=str(one), more_audio=(str(two),)),
        QAItem("one", "Is it high?", ["yes", "no"], 0, audio=str(two)),
    ]
    batch = collate(items)
    assert batch["prompts"][0].count(family.audio_token) == 2 and batch["prompts"][1].count(family.audio_token) == 1
    assert batch["input_features"].shape[0] == 3 and batch["audio_clips"].tolist() == [2, 1]
    frames = batch["feature_attention_mask"].sum(-1)
    assert frames.tolist() == [50, 150, 150]  # 100 mel frames a second, clips in prompt then placeholder order
    expected = family.audio_token_count(frames).tolist()
    assert audio_runs(batch["input_ids"][0], processor.audio_token_id) == expected[:2]
    assert audio_runs(batch["input_ids"][1], processor.audio_token_id) == expected[2:]

    model = load_model(cfg.model).eval()
    reference_logits_match(model, family, batch)
    policy = Policy(model, processor, family, shared_prefix=False)
    media = policy.encode(batch)
    assert media["audio"].shape[0] == sum(expected)
    settings = {"max_new_tokens": 4}
    ids, _ = policy.generate(batch, media, 1, settings)
    twice, _ = policy.generate(batch, media, 2, settings)  # each prompt's clips repeated with it
    assert ids.shape[0] == 2 and torch.equal(twice[::2], ids) and torch.equal(twice[1::2], ids)


def test_each_prompts_clips_are_repeated_together_in_order():
    batch = {"feature_attention_mask": torch.arange(4)[:, None], "audio_clips": torch.tensor([2, 0, 1, 1])}
    batch["input_ids"] = torch.zeros(4, 1)
    rep = mm.repeat_prompts(batch, 2)
    assert rep["feature_attention_mask"][:, 0].tolist() == [0, 1, 0, 1, 2, 2, 3, 3]
    assert rep["audio_clips"].tolist() == [2, 2, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "model_name, encoded_frames",
    [("tiny_qwen2_audio", 200), ("tiny_qwen2_5_omni", 6000), ("tiny_qwen3_omni", 6000)],
)
def test_a_60_s_clip_is_encoded_whole_by_the_omni_families_and_cut_at_the_window_by_qwen2_audio(
    tmp_path, model_name, encoded_frames
):
    """The tiny models' window is 2 s (200 mel frames; the published checkpoints': 30 s)."""
    cfg, processor, collate = setup(model_name, max_audio_seconds=120)
    family = families.get(cfg.model.family)
    long = write_wav(tmp_path / "long.wav", seconds=60, freq=440)
    batch = collate([QAItem("long", "Is it high?", ["yes", "no"], 0, audio=str(long))])
    assert int(batch["feature_attention_mask"].sum()) == encoded_frames
    assert batch["input_features"].shape[-1] == max(encoded_frames, 200)
    tokens = int((batch["input_ids"] == processor.audio_token_id).sum())
    assert tokens == int(family.audio_token_count(torch.tensor([encoded_frames])))
    assert processor.heard_seconds(120) == (120 if family.long_audio else 2)
    if family.long_audio:
        model = load_model(cfg.model).eval()
        reference_logits_match(model, family, batch)
        ids, _ = Policy(model, processor, family, shared_prefix=False).generate(
            batch, mm.encode_media(model, family, batch), 1, {"max_new_tokens": 2}
        )
        assert ids.shape == (1, 2)


def test_clips_shorter_than_the_window_get_the_same_features_as_before(tmp_path):
    """Long-audio families pad to the window as the published processors do, so short clips are unchanged."""
    _, processor, _ = setup("tiny_qwen2_5_omni")
    clip = np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440).astype(np.float32)
    ours = processor.audio_features([clip])
    theirs = processor.feature_extractor([clip], sampling_rate=16000, padding="max_length", return_tensors="pt")
    assert torch.equal(ours["input_features"], theirs["input_features"])


def test_audio_controls_reach_every_clip(tmp_path):
    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal(800).astype(np.float32) * s for s in (0.1, 0.5))
    item = QAItem("x", "q", ["a", "b"], 0, waveform=first, more_waveforms=(second,))
    muted = QAItem("x", "q", ["a", "b"], 0, waveform=first, more_waveforms=(second,))
    audio_controls.replace_clips(muted, "muted")
    assert [w.any() for w in muted.waveforms] == [False, False] and [len(w) for w in muted.waveforms] == [800, 800]
    audio_controls.replace_clips(item, "noise")
    rms = [float(np.sqrt(np.mean(w.astype(np.float64) ** 2))) for w in item.waveforms]
    assert 0.05 < rms[0] < 0.2 and 0.3 < rms[1] < 0.7  # each clip's noise at its own level
    other = QAItem("y", "q", ["a", "b"], 0, audio="/y1.wav", more_audio=("/y2.wav",))
    shuffled = audio_controls.ShuffledAudio([QAItem("z", "q", ["a"], 0, audio="/z.wav"), other])
    assert shuffled[0].audio_paths == ["/y1.wav", "/y2.wav"] and shuffled[1].audio_paths == ["/z.wav"]


@pytest.mark.parametrize("model_name", ["tiny_qwen2_audio", "tiny_qwen2_5_omni"])
def test_the_collator_renders_the_prompts_system_turn_before_the_clips(tmp_path, model_name):
    """PromptSpec.system reaches the chat template (templates.chat_messages) as the conversation's first turn; the
    user turn keeps its clips."""
    cfg, processor, collate = setup(model_name)
    collate.prompt = dataclasses.replace(collate.prompt, system="Be brief.")
    clip = str(write_wav(tmp_path / "a.wav", seconds=0.5))
    (prompt,) = collate([QAItem("1", "Is it high?", ["yes", "no"], 0, audio=clip, more_audio=(clip,))])["prompts"]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert prompt.count(families.get(cfg.model.family).audio_token) == 2 and "You are a helpful" not in prompt


def test_training_micro_batches_refuse_prompts_with_several_clips():
    """GRPO's update slices a batch by prompt assuming one clip each: a batch with `audio_clips` is refused by name."""
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "audio_clips": torch.tensor([2, 1])}
    with pytest.raises(NotImplementedError, match="several audio clips"):
        prompt_slice(batch, slice(0, 1))
    assert prompt_slice({"input_ids": batch["input_ids"]}, slice(0, 1))["input_ids"].shape == (1, 3)
