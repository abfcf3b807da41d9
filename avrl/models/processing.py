"""Turns rendered chat prompts plus audio (and images) into model inputs, for every model family.

One small processor instead of `Qwen2AudioProcessor` / `Qwen2_5OmniProcessor` / `Qwen3OmniMoeProcessor`: each
expands the audio placeholder into as many placeholder tokens as the encoder will output, and the Omni processors
also need a video processor (and so torchvision) even for audio+image questions. The family supplies the chat
template, the placeholder tokens and the token-count rule those processors use (avrl/models/families).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, WhisperFeatureExtractor

from avrl.models.families import Family
from avrl.models.templates import chat_messages


class AudioTextProcessor:
    def __init__(self, tokenizer, feature_extractor, image_processor, family: Family):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # generation appends on the right
        self.feature_extractor = feature_extractor
        self.image_processor = image_processor
        self.family = family
        self.audio_token_id = tokenizer.convert_tokens_to_ids(family.audio_token)
        self.sampling_rate = feature_extractor.sampling_rate

    @classmethod
    def from_pretrained(cls, path: str | Path, family: Family, with_images: bool = False, **hub_kwargs):
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(path, **hub_kwargs)
        image_processor = None
        if with_images:
            image_processor = AutoImageProcessor.from_pretrained(path, **hub_kwargs)
        return cls(tokenizer, feature_extractor, image_processor, family)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.chat_template = self.family.chat_template
        self.tokenizer.save_pretrained(path)
        # As in the published Omni checkpoints, audio and image settings share preprocessor_config.json.
        settings = self.feature_extractor.to_dict()
        if self.image_processor is not None:
            settings.update(self.image_processor.to_dict())
        (Path(path) / "preprocessor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")

    @property
    def stop_token_ids(self) -> list[int]:
        """End of turn first (what SFT targets end with), then end of text."""
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return [i for i in ids if i is not None and i != self.tokenizer.unk_token_id]

    def render(self, text: str, audios: int = 1, has_image: bool = False, system: str | None = None) -> str:
        """The chat prompt for one user turn, ending with the assistant header: the image (if any), then `audios`
        audio placeholders (a bool counts as 0 or 1), then the text; after a system turn when `system` is given
        (PromptSpec.system; None: the chat template's default). The messages: templates.chat_messages."""
        return self.tokenizer.apply_chat_template(
            chat_messages(text, audios, has_image, system),
            chat_template=self.family.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )

    @property
    def window_seconds(self) -> float:
        """The feature extractor's window (30 s for the published checkpoints, 2 s for the tiny ones)."""
        return self.feature_extractor.n_samples / self.sampling_rate

    def heard_seconds(self, max_audio_seconds: float) -> float:
        """How much of each clip the model hears: data.max_audio_seconds for a family whose encoder takes long
        audio (Family.long_audio), else no more than the feature extractor's window."""
        return max_audio_seconds if self.family.long_audio else min(max_audio_seconds, self.window_seconds)

    def audio_features(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Log-mel features of the clips, padded to the window (30 s) as the published processors pad them; past
        it, a long-audio family's clips are padded to the longest clip and kept whole, any other family's are cut
        at the window (WhisperFeatureExtractor's truncation, as Qwen2AudioProcessor leaves it)."""
        window = self.feature_extractor.n_samples
        longest = max(len(c) for c in clips)
        feats = self.feature_extractor(
            clips,
            sampling_rate=self.sampling_rate,
            padding="max_length",
            max_length=max(window, longest) if self.family.long_audio else window,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return {"input_features": feats["input_features"], "feature_attention_mask": feats["attention_mask"]}

    def __call__(self, prompts: list[str], audios: list, images: list | None = None) -> dict:
        """Tokenise rendered prompts, expanding each placeholder to the number of encoder outputs.

        `audios[i]` is prompt i's audio: None, one waveform, or a list of waveforms, one per audio placeholder in
        its order (the features are flat, in prompt then placeholder order); `images[i]` its image or None (at
        most one). When a prompt holds other than one clip, `audio_clips` (clips per prompt) comes with the batch,
        so that the features can be repeated with their prompts (multimodal.repeat_prompts).
        """
        images = images if images is not None else [None] * len(prompts)
        per_prompt = [[] if a is None else list(a) if isinstance(a, list | tuple) else [a] for a in audios]
        out: dict[str, torch.Tensor] = {}
        texts = list(prompts)
        clips = [c for prompt_clips in per_prompt for c in prompt_clips]
        if clips:
            out.update(self.audio_features(clips))
            counts = iter(self.family.audio_token_count(out["feature_attention_mask"].sum(-1)).tolist())
            texts = [
                self._expand(t, self.family.audio_token, [next(counts) for _ in c]) for t, c in zip(texts, per_prompt)
            ]
            if any(len(c) != 1 for c in per_prompt):
                out["audio_clips"] = torch.tensor([len(c) for c in per_prompt])
        pictures = [im for im in images if im is not None]
        if pictures:
            if self.image_processor is None:
                raise ValueError("an item has an image but this model was loaded without an image processor")
            vis = self.image_processor(images=pictures, return_tensors="pt")
            out["pixel_values"] = vis["pixel_values"]
            out["image_grid_thw"] = vis["image_grid_thw"]
            merge = self.image_processor.merge_size**2
            counts = iter((vis["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [
                self._expand(t, self.family.image_token, [next(counts)] if im is not None else [])
                for t, im in zip(texts, images)
            ]
        tok = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        out["input_ids"] = tok["input_ids"]
        out["attention_mask"] = tok["attention_mask"]
        return out

    @staticmethod
    def _expand(text: str, token: str, counts: list[int]) -> str:
        """The first len(counts) placeholders of `token` repeated counts[k] times each, in order."""
        head, rest = "", text
        for count in counts:
            before, found, rest = rest.partition(token)
            if not found:
                raise ValueError(f"the prompt has fewer {token} placeholders than media ({len(counts)})")
            head += before + token * count
        return head + rest

    def decode(self, ids) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
