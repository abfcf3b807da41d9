"""Loading audio (librosa, 16 kHz, one channel or the mean of them, truncated) and images for one item, with errors
that name the item."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
from PIL import Image

from avrl.data.items import DataError, QAItem


def load_audio(
    path: str, sampling_rate: int, max_seconds: float, source: str, channel: int | None = None
) -> np.ndarray:
    """A clip at `sampling_rate`, cut at `max_seconds`: the mean of its channels (librosa's mono) when `channel` is
    None, else that channel (counted from 0; a mono file's only channel is 0). R1-AQA's loader keeps channel 0."""
    try:
        audio, _ = librosa.load(path, sr=sampling_rate, mono=channel is None, duration=max_seconds)
    except Exception as e:  # librosa raises many types for unreadable files
        raise DataError(f"{source}: cannot read audio file {path}: {type(e).__name__}: {e}") from None
    if channel is not None:
        audio = _channel(audio, channel, path, source)
    if audio.size == 0:
        raise DataError(f"{source}: audio file {path} holds no samples")
    truncated = wav_truncation(path)
    if truncated:
        raise DataError(f"{source}: audio file {path} {truncated}")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _channel(audio: np.ndarray, channel: int, path: str, source: str) -> np.ndarray:
    """One channel of librosa's (channels, samples) array; a mono file comes back 1-D."""
    channels = audio[None] if audio.ndim == 1 else audio
    if not 0 <= channel < channels.shape[0]:
        raise DataError(
            f"{source}: data.audio_channel={channel}, but audio file {path} has {channels.shape[0]} channel(s) "
            f"(channels count from 0; null = the mean of the channels)"
        )
    return channels[channel]


# Formats libsndfile reads (soundfile.available_formats(), by file extension and by leading bytes). A file of one
# of these that libsndfile cannot open is not audio; any other file (.m4a, .aac, .mp4, ...) librosa hands to
# audioread, whose decoders are too slow to run up front: such a file is checked when its item is loaded.
_SNDFILE_EXTENSIONS = {
    ".wav",
    ".wave",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".mp3",
    ".aif",
    ".aiff",
    ".aifc",
    ".au",
    ".snd",
    ".caf",
    ".w64",
    ".rf64",
    ".wavex",
}
_SNDFILE_MAGIC = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"FORM", b".snd", b"caff", b"ID3")


def check_audio_header(path: str) -> str | None:
    """What is wrong with an audio file, found from its header alone (no decoding), or None: not audio, no
    samples, or a WAV cut short. The reader calls this for every clip before training starts, so that a bad clip
    is not first met when its batch comes; loading (`load_audio`) still catches what a header cannot show.
    About 70 us a file (14 k files a second, 1 s WAVs on a local disk with a warm cache; 2-core machine)."""
    try:
        with sf.SoundFile(path) as f:  # opening reads the header only (sf.info, which also formats a log, is 3x slower)
            frames = f.frames
    except Exception as e:  # soundfile.LibsndfileError and, for odd files, TypeError/RuntimeError
        with open(path, "rb") as f:
            magic = f.read(4)
        if Path(path).suffix.lower() in _SNDFILE_EXTENSIONS or magic.startswith(_SNDFILE_MAGIC):
            why = getattr(e, "error_string", None) or f"{type(e).__name__}: {e}"  # libsndfile's own words
            return f"is not audio (libsndfile cannot read its header: {why})"
        return None  # another container (m4a, mp4, ...): decoded, and checked, when its item is loaded
    if frames == 0:
        return "holds no samples"
    return wav_truncation(path)


def wav_truncation(path: str) -> str | None:
    """For a WAV whose data chunk promises more sample frames than the file holds, why it is truncated; else None.
    libsndfile reads a cut WAV without complaint (it trims to the samples present), so a half-written file would
    otherwise train as a shorter clip. A streaming writer's placeholder size (0 or 0xFFFFFFFF: length unknown) is
    not a promise; other formats are left to their decoders."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        position, block_align = 12, 1
        while position + 8 <= size:  # the chunks, in order, up to the data chunk
            f.seek(position)
            chunk = f.read(24)
            name, length = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if name == b"fmt " and len(chunk) >= 22:
                block_align = max(1, int.from_bytes(chunk[20:22], "little"))  # bytes per sample frame
            elif name == b"data":
                start = position + 8
                if length in (0, 0xFFFFFFFF) or start + length <= size:
                    return None
                promised, present = length // block_align, (size - start) // block_align
                return (
                    f"is truncated: its header declares {start + length} bytes, the file has {size} "
                    f"({present} of {promised} sample frames)"
                )
            position += 8 + length + (length & 1)  # chunks are padded to an even length
    return None


@dataclasses.dataclass(frozen=True)
class ImageResize:
    """EchoInk's image sizes (`smart_resize` of Qwen's vision utils, qwen_omni_utils / qwen-vl-utils, which EchoInk
    calls with 28, 3,136, 200,704): height and width rounded to the nearest multiples of `factor` (at least one),
    then, if the area leaves [min_pixels, max_pixels], both scaled by the same factor (aspect ratio kept) and
    rounded down (too large) or up (too small) to multiples of `factor`. A side over 200 times the other is
    refused, as upstream does. The image is resized with Pillow's `Image.resize` default filter, as upstream
    calls it (bicubic for RGB)."""

    min_pixels: int
    max_pixels: int
    factor: int = 28
    max_ratio = 200  # qwen-vl-utils' MAX_RATIO

    @classmethod
    def from_config(cls, cfg) -> ImageResize | None:
        """From data.image_min_pixels / image_max_pixels / image_factor; None (no resizing) when both pixel limits
        are null. One left null takes qwen-vl-utils' default: 4 and 16,384 times factor^2."""
        low, high, factor = cfg.get("image_min_pixels"), cfg.get("image_max_pixels"), cfg.get("image_factor", 28)
        if low is None and high is None:
            return None
        low = 4 * factor**2 if low is None else low
        high = 16384 * factor**2 if high is None else high
        if not 0 < low <= high:
            raise ValueError(f"data.image_min_pixels ({low}) must be > 0 and <= data.image_max_pixels ({high})")
        return cls(int(low), int(high), int(factor))

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing."""
        f = self.factor
        h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
        if h * w > self.max_pixels:
            scale = math.sqrt(height * width / self.max_pixels)
            h, w = math.floor(height / scale / f) * f, math.floor(width / scale / f) * f
        elif h * w < self.min_pixels:
            scale = math.sqrt(self.min_pixels / (height * width))
            h, w = math.ceil(height * scale / f) * f, math.ceil(width * scale / f) * f
        return h, w

    def __call__(self, image: Image.Image, path: str, source: str) -> Image.Image:
        width, height = image.size
        if max(height, width) / min(height, width) > self.max_ratio:
            raise DataError(
                f"{source}: image file {path} is {width}x{height}: an aspect ratio over {self.max_ratio}, which "
                f"Qwen's smart_resize refuses (data.image_min_pixels/image_max_pixels are set)"
            )
        height, width = self.size(height, width)
        return image.resize((width, height))  # Pillow's default filter, as upstream


def load_image(path: str, source: str, resize: ImageResize | None = None):
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception as e:
        raise DataError(f"{source}: cannot read image file {path}: {type(e).__name__}: {e}") from None
    return resize(image, path, source) if resize is not None else image


def with_media(
    item: QAItem,
    sampling_rate: int,
    max_seconds: float,
    channel: int | None = None,
    image_resize: ImageResize | None = None,
) -> tuple[QAItem, object]:
    """The item with its waveforms loaded, every clip (truncated to max_seconds; `channel`: see load_audio), and
    its image (or None; resized by `image_resize` when given)."""
    waveform, more = item.waveform, item.more_waveforms
    if waveform is None and item.audio is not None:
        waveform, *more = (load_audio(p, sampling_rate, max_seconds, item.source, channel) for p in item.audio_paths)
    elif waveform is not None:
        waveform, *more = (w[: int(max_seconds * sampling_rate)] for w in item.waveforms)
    image = load_image(item.image, item.source, image_resize) if item.image else None
    return dataclasses.replace(item, waveform=waveform, more_waveforms=tuple(more)), image
