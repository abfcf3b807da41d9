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
    return audio.astype(np.float32)


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
