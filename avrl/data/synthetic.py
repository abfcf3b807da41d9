"""A seeded audio question-answering task that can only be solved by listening.

Every question is about a property of the clip (pitch, loudness, number of beeps, order of two tones), the
wording is the same whatever the answer, and the choices are shuffled, so the text alone gives chance accuracy.
Clips are generated on the fly from (seed, split, index): nothing is downloaded or stored.
"""

from __future__ import annotations

import zlib

import numpy as np

from avrl.data.items import QAItem

SAMPLE_RATE = 16_000

QUESTIONS = {
    "pitch": ("Is the tone in the audio high or low in pitch?", ["high", "low"]),
    "loudness": ("Is the sound in the audio loud or quiet?", ["loud", "quiet"]),
    "count": ("How many beeps are in the audio?", ["one", "two", "three"]),
    "order": ("Which tone comes first in the audio?", ["the high tone", "the low tone"]),
}
TASKS = tuple(QUESTIONS)
# The out-of-distribution shifts of the toy world (docs/toy_world.md), each its own split "ood_<shift>": scored
# after training with final_eval.ood_shifts=[...] as val_ood_<shift>/accuracy.
SHIFTS = ("band_outside", "duration", "noise", "wording")
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2, "ood": 3, **{f"ood_{s}": 4 + i for i, s in enumerate(SHIFTS)}}
# The out-of-distribution split ("ood", data.ood_size items): the same questions and answers about tones from
# frequency bands no other split uses — an acoustic shift. The wording and the noise floor stay: on the tiny base
# model a paraphrased question, or a noise floor only 2x louder, breaks the answer format before any training
# (measured), so the split would measure format collapse, not what was learnt about pitch.
# Per condition: noise floor; low and high tone bands (pitch, order); loudness tone band; beep band (count).
# `tone` (seconds, a range): the pitch tone's length; absent, 0.6 x the clip's length (0.9 s).
IN = dict(noise=0.003, low=(200, 400), high=(1500, 3000), loudness=(300, 2000), beep=(500, 1500))
CONDITIONS = {
    "in": IN,
    "ood": dict(noise=0.003, low=(450, 650), high=(1000, 1400), loudness=(2200, 3200), beep=(1600, 2400)),
    # The shifts of docs/toy_world.md (the target, pitch, is what they are scored on; the other skills keep the
    # training conditions but for the noise floor): tones outside the training range on both sides (below
    # Nyquist, 8 kHz); a 0.15-0.3 s tone in the training bands; a noise floor 0.05 (training: 0.003, tone 0.5).
    "ood_band_outside": {**IN, "low": (80, 180), "high": (3500, 6000)},
    "ood_duration": {**IN, "tone": (0.15, 0.3)},
    "ood_noise": {**IN, "noise": 0.05},
    "ood_wording": IN,
}
# Split ood_wording: the pitch question in one of three paraphrases (drawn per item), the choices unchanged. The
# other skills keep their one wording (docs/toy_world.md lists paraphrases of the pitch question only).
PARAPHRASES = {
    "pitch": (
        "Does the audio contain a high or a low tone?",
        "Is the pitch of this sound high or low?",
        "Would you call this tone high-pitched or low-pitched?",
    )
}


def _tone(rng: np.random.Generator, freq: float, seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms ramps, no clicks
    return amplitude * envelope * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))


def _clip(rng: np.random.Generator, task: str, answer: str, seconds: float, condition: str = "in") -> np.ndarray:
    c = CONDITIONS[condition]
    n = int(seconds * SAMPLE_RATE)
    audio = rng.normal(0.0, c["noise"], n)  # a faint noise floor
    low, high = rng.uniform(*c["low"]), rng.uniform(*c["high"])
    if task == "pitch":
        length = rng.uniform(*c["tone"]) if "tone" in c else seconds * 0.6
        tone = _tone(rng, high if answer == "high" else low, length, 0.5)
        start = rng.integers(0, n - len(tone))
        audio[start : start + len(tone)] += tone
    elif task == "loudness":
        tone = _tone(rng, rng.uniform(*c["loudness"]), seconds * 0.6, 0.8 if answer == "loud" else 0.02)
        start = rng.integers(0, n - len(tone))
        audio[start : start + len(tone)] += tone
    elif task == "count":
        beeps = ["one", "two", "three"].index(answer) + 1
        slot = n // 3
        freq = rng.uniform(*c["beep"])
        for k in range(beeps):
            beep = _tone(rng, freq, 0.12, 0.5)
            start = k * slot + rng.integers(0, slot - len(beep))
            audio[start : start + len(beep)] += beep
    elif task == "order":
        first, second = (high, low) if answer == "the high tone" else (low, high)
        half = n // 2
        a, b = _tone(rng, first, seconds * 0.35, 0.5), _tone(rng, second, seconds * 0.35, 0.5)
        audio[: len(a)] += a
        audio[half : half + len(b)] += b
    else:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {TASKS}")
    return audio.astype(np.float32)


def make_item(seed: int, split: str, index: int, tasks=TASKS, seconds: float = 1.5, label_mode="gold") -> QAItem:
    """Item `index` of a split. label_mode="random" replaces the gold answer by a random choice: training on such
    labels teaches the answer format and nothing about the audio. A mapping {task: "gold" | "random"} sets it per
    task (the tiny base model is built that way)."""
    key = zlib.crc32(f"{seed}/{SPLIT_OFFSETS[split]}/{index}".encode())
    rng = np.random.default_rng(key)
    task = tasks[rng.integers(len(tasks))]
    question, choices = QUESTIONS[task]
    answer = choices[rng.integers(len(choices))]
    shuffled = list(rng.permutation(choices))
    audio = _clip(rng, task, answer, seconds, split if split in CONDITIONS else "in")
    answer_index = shuffled.index(answer)
    mode = label_mode if isinstance(label_mode, str) else label_mode.get(task, "gold")
    if mode == "random":
        answer_index = int(rng.integers(len(shuffled)))
    elif mode != "gold":
        raise ValueError(f"label_mode must be 'gold' or 'random' (or a mapping task -> mode), got {mode!r}")
    if split == "ood_wording" and task in PARAPHRASES:  # drawn last: every other draw as in the other splits
        question = PARAPHRASES[task][int(rng.integers(len(PARAPHRASES[task])))]
    return QAItem(
        id=f"synthetic-{split}-{index}",
        question=question,
        choices=[str(c) for c in shuffled],
        answer_index=answer_index,
        waveform=audio,
        category=task,
        source=f"synthetic(seed={seed}, split={split})[{index}]",
    )


class SyntheticAudioQA:
    """A map-style dataset of `size` synthetic items."""

    def __init__(self, split: str, size: int, seed: int = 0, tasks=TASKS, seconds: float = 1.5, label_mode="gold"):
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {list(SPLIT_OFFSETS)}, got {split!r}")
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown synthetic tasks {sorted(unknown)}; expected a subset of {TASKS}")
        self.split, self.size, self.seed = split, size, seed
        self.tasks, self.seconds, self.label_mode = tuple(tasks), seconds, label_mode

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> QAItem:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return make_item(self.seed, self.split, index, self.tasks, self.seconds, self.label_mode)
