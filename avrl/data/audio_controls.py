"""Audio-contribution controls: evaluate with the audio muted, replaced by noise, or shuffled across items
(`eval.audio=real|muted|noise|shuffled`), to measure how much a model's answers depend on what it hears.

- muted: silence of the clip's own length (the prompt keeps its number of audio tokens; only the signal goes).
- noise: white noise at the clip's own RMS level, seeded by the item id (the same noise on every run).
- shuffled: each item gets the clip of another item of the same split (a fixed derangement, seeded): real audio,
  unrelated to the question.

Audio reliance = accuracy with the real audio - accuracy with it muted: ~0 means the model answers from the text.
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
from torch.utils.data import Dataset

CONTROLS = ("real", "muted", "noise", "shuffled")


def check(mode: str) -> str:
    if mode not in CONTROLS:
        raise ValueError(f"eval.audio must be one of {CONTROLS}, got {mode!r}")
    return mode


def replace_signal(waveform: np.ndarray, mode: str, item_id: str) -> np.ndarray:
    """The clip muted or replaced by noise of its own level (other modes: unchanged)."""
    if mode == "muted":
        return np.zeros_like(waveform)
    if mode == "noise":
        rms = float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64)))) if waveform.size else 0.0
        rng = np.random.default_rng(zlib.crc32(item_id.encode()))
        return (rng.standard_normal(waveform.shape) * rms).astype(waveform.dtype)
    return waveform


def replace_clips(item, mode: str) -> None:
    """Every loaded clip of the item muted or replaced by noise (in place); the first clip's noise is seeded by the
    item id, clip k's (k >= 1) by "<id>/clip<k>"."""
    if item.waveform is None or mode in ("real", "shuffled"):
        return
    first, *more = (
        replace_signal(w, mode, item.id if k == 0 else f"{item.id}/clip{k}") for k, w in enumerate(item.waveforms)
    )
    item.waveform, item.more_waveforms = first, tuple(more)


class ShuffledAudio(Dataset):
    """A split whose item i carries the audio (files or waveforms, every clip) of item perm[i], perm a
    derangement."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        if len(dataset) < 2:
            raise ValueError("eval.audio=shuffled needs a split of at least 2 items")
        self.dataset = dataset
        order = np.random.default_rng(seed).permutation(len(dataset))
        # Each item takes the clip of the next one in a random cycle: nobody keeps their own.
        self.source = np.empty(len(dataset), dtype=np.int64)
        self.source[order] = np.roll(order, -1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = copy.copy(self.dataset[index])
        other = self.dataset[int(self.source[index])]
        item.audio, item.waveform = other.audio, other.waveform
        item.more_audio, item.more_waveforms = other.more_audio, other.more_waveforms  # all of its clips
        return item
