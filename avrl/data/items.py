"""The one record every reader produces and every consumer (prompts, rewards, evaluation) reads."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LETTERS = string.ascii_uppercase  # choice i is lettered LETTERS[i]: A for the first


@dataclass
class QAItem:
    id: str
    question: str
    choices: list[str]  # option texts without letters
    answer_index: int | None  # None: no answer to score against (a prediction-only file, e.g. MMAU test)
    audio: str | None = None  # absolute path to the audio file (the first, for an item with several clips)
    image: str | None = None  # absolute path to the image file (Omni data)
    waveform: np.ndarray | None = None  # in-memory mono audio at 16 kHz (synthetic data); the loaded `audio`
    # MMAU-Pro's items with several clips: the clips after `audio`, in the record's order, and once loaded their
    # waveforms; every clip is put in the prompt, in order (avrl/models/processing.py)
    more_audio: tuple[str, ...] = ()
    more_waveforms: tuple[np.ndarray, ...] = ()
    category: str | None = None  # MMAU task (sound/music/speech) or synthetic task name
    difficulty: str | None = None
    source: str = ""  # "file:line" or "file[item]", for error messages
    meta: dict[str, Any] = field(default_factory=dict)  # the original record, written back into predictions
    options_text: list[str] | None = None  # the options as the data file writes them, letters included (AVQA-R1)

    @property
    def answer(self) -> str:
        if self.answer_index is None:
            raise DataError(f"{self.source or self.id}: no answer (the item is read for prediction only)")
        return self.choices[self.answer_index]

    @property
    def has_audio(self) -> bool:
        return self.audio is not None or self.waveform is not None

    @property
    def audio_paths(self) -> list[str]:
        """Every clip's file, in order (none for in-memory audio)."""
        return [self.audio, *self.more_audio] if self.audio is not None else []

    @property
    def waveforms(self) -> list[np.ndarray]:
        """Every loaded clip, in order: what the prompt holds."""
        return [self.waveform, *self.more_waveforms] if self.waveform is not None else []


class DataError(ValueError):
    """Bad input: the message names the file and the line or item."""
