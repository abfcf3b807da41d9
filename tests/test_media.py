"""Loading one item's media (avrl/data/media.py): which channel of a multi-channel clip is heard
(data.audio_channel), and EchoInk's image resizing (data.image_min_pixels / image_max_pixels / image_factor)."""

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from avrl.data.items import DataError, QAItem
from avrl.data.media import load_audio, with_media
from avrl.datamodule import AudioQADataModule

SR = 16000


def stereo_wav(path, seconds=0.5):
    """A stereo WAV whose channels differ: a 440 Hz tone at 0.5 on the left, an 880 Hz tone at 0.2 on the right."""
    t = np.arange(int(seconds * SR)) / SR
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 880 * t)
    sf.write(path, np.stack([left, right], axis=1).astype(np.float32), SR, subtype="FLOAT")
    return left, right


def test_audio_channel_null_is_the_mean_and_an_index_is_that_channel(tmp_path):
    left, right = stereo_wav(tmp_path / "s.wav")
    mean = load_audio(str(tmp_path / "s.wav"), SR, 30, "item 1")
    np.testing.assert_allclose(mean, (left + right) / 2, atol=1e-6)  # librosa's mono: the mean of the channels
    np.testing.assert_allclose(load_audio(str(tmp_path / "s.wav"), SR, 30, "item 1", channel=0), left, atol=1e-6)
    np.testing.assert_allclose(load_audio(str(tmp_path / "s.wav"), SR, 30, "item 1", channel=1), right, atol=1e-6)
    cut = load_audio(str(tmp_path / "s.wav"), SR, 0.25, "item 1", channel=1)
    np.testing.assert_allclose(cut, right[: SR // 4], atol=1e-6)  # the channel is cut at max_seconds too


def test_a_mono_file_is_its_only_channel_and_a_channel_past_the_files_is_an_error_naming_it(tmp_path):
    t = np.arange(SR // 2) / SR
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    sf.write(tmp_path / "m.wav", tone, SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(str(tmp_path / "m.wav"), SR, 30, "x", channel=0), tone, atol=1e-6)
    with pytest.raises(DataError, match=r"item 7: data.audio_channel=1, but audio file .*m.wav has 1 channel"):
        load_audio(str(tmp_path / "m.wav"), SR, 30, "item 7", channel=1)
    stereo_wav(tmp_path / "s.wav")
    with pytest.raises(DataError, match=r"data.audio_channel=2, but audio file .*s.wav has 2 channel"):
        load_audio(str(tmp_path / "s.wav"), SR, 30, "item 8", channel=2)


def test_the_datamodule_passes_data_audio_channel_to_the_loader(tmp_path):
    left, _ = stereo_wav(tmp_path / "s.wav")
    item = QAItem("1", "q", ["a", "b"], 0, audio=str(tmp_path / "s.wav"), source="f:1")
    cfg = OmegaConf.create({"max_audio_seconds": 30, "on_error": "raise", "audio_channel": 0})
    collate = AudioQADataModule(cfg, None, None).collate
    loaded, _ = with_media(item, SR, collate.max_audio_seconds, collate.audio_channel)
    np.testing.assert_allclose(loaded.waveform, left, atol=1e-6)
