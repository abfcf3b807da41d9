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

    def render(self, text: str, has_audio: bool = True, has_image: bool = False) -> str:
        """The chat prompt for one user turn, ending with the assistant header."""
        content = []
        if has_image:
            content.append({"type": "image", "image": "<image>"})
        if has_audio:
            content.append({"type": "audio", "audio_url": "<audio>"})
        content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.family.chat_template, tokenize=False, add_generation_prompt=True
        )

    def __call__(self, prompts: list[str], audios: list[np.ndarray | None], images: list | None = None) -> dict:
        """Tokenise rendered prompts, expanding each placeholder to the number of encoder outputs.

        Each prompt holds at most one audio and one image placeholder; `audios[i]` / `images[i]` is its media.
        """
        images = images if images is not None else [None] * len(prompts)
        out: dict[str, torch.Tensor] = {}
        texts = list(prompts)
        clips = [a for a in audios if a is not None]
        if clips:
            feats = self.feature_extractor(
                clips,
                sampling_rate=self.sampling_rate,
                padding="max_length",
                return_attention_mask=True,
                return_tensors="pt",
            )
            out["input_features"] = feats["input_features"]
            out["feature_attention_mask"] = feats["attention_mask"]
            counts = iter(self.family.audio_token_count(feats["attention_mask"].sum(-1)).tolist())
            texts = [
                t.replace(self.family.audio_token, self.family.audio_token * next(counts), 1) if a is not None else t
                for t, a in zip(texts, audios)
            ]
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
                t.replace(self.family.image_token, self.family.image_token * next(counts), 1) if im is not None else t
                for t, im in zip(texts, images)
            ]
        tok = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        out["input_ids"] = tok["input_ids"]
        out["attention_mask"] = tok["attention_mask"]
        return out

    def decode(self, ids) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
