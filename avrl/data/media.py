"""Loading audio (librosa, 16 kHz mono, truncated) and images for one item, with errors that name the item."""

from __future__ import annotations

import dataclasses

import numpy as np

from avrl.data.items import DataError, QAItem


def load_audio(path: str, sampling_rate: int, max_seconds: float, source: str) -> np.ndarray:
    import librosa

    try:
        audio, _ = librosa.load(path, sr=sampling_rate, mono=True, duration=max_seconds)
    except Exception as e:  # librosa raises many types for unreadable files
        raise DataError(f"{source}: cannot read audio file {path}: {type(e).__name__}: {e}") from None
    if audio.size == 0:
        raise DataError(f"{source}: audio file {path} holds no samples")
    declared, actual = _wav_sizes(path)
    if declared > actual:
        raise DataError(f"{source}: audio file {path} is truncated: its header declares {declared} bytes, "
                        f"the file has {actual}")
    return audio.astype(np.float32)


def _wav_sizes(path: str) -> tuple[int, int]:
    """(size the RIFF header declares, size on disk) of a WAV file; (0, size) for other formats.
    libsndfile reads a cut WAV without complaint (it trims to the samples present), so a half-written file
    would otherwise train as a shorter clip; compressed formats fail to decode instead."""
    import os

    actual = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return int.from_bytes(head[4:8], "little") + 8, actual
    return 0, actual


def load_image(path: str, source: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise DataError(f"{source}: cannot read image file {path}: {type(e).__name__}: {e}") from None


def with_media(item: QAItem, sampling_rate: int, max_seconds: float) -> tuple[QAItem, object]:
    """The item with its waveform loaded (truncated to max_seconds), and its image (or None)."""
    waveform = item.waveform
    if waveform is None and item.audio is not None:
        waveform = load_audio(item.audio, sampling_rate, max_seconds, item.source)
    elif waveform is not None:
        waveform = waveform[: int(max_seconds * sampling_rate)]
    image = load_image(item.image, item.source) if item.image else None
    return dataclasses.replace(item, waveform=waveform), image
