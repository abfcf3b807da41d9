"""Loading one item's media (avrl/data/media.py): which channel of a multi-channel clip is heard
(data.audio_channel), and EchoInk's image resizing (data.image_min_pixels / image_max_pixels / image_factor)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from avrl.data.items import DataError, QAItem
from avrl.data.media import ImageResize, load_audio, load_image, with_media
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
    collate = AudioQADataModule(cfg, SimpleNamespace(sampling_rate=SR), None).collate
    loaded, _ = collate.load(item)
    np.testing.assert_allclose(loaded.waveform, left, atol=1e-6)


# ------------------------------------------------------------------------------------ EchoInk's image resizing
def reference_size(height, width, factor, min_pixels, max_pixels):
    """smart_resize as qwen-vl-utils' docstring and code state it, written out step by step."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        return math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    if h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        return math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


ECHOINK = dict(image_min_pixels=3136, image_max_pixels=200704, image_factor=28)


@pytest.mark.parametrize(
    "height, width",
    [(720, 1280), (10, 10), (6000, 8000), (28, 5000), (10, 1900), (1, 3), (333, 500), (448, 448), (4000, 30)],
)
def test_image_sizes_follow_smart_resize(height, width):
    resize = ImageResize.from_config(ECHOINK)
    h, w = resize.size(height, width)
    assert (h, w) == reference_size(height, width, 28, 3136, 200704)
    assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
    if height * width >= 3136 and max(height, width) / min(height, width) < 50:  # far from the rounding limits
        assert 3136 <= h * w <= 200704 and abs(math.log((h / w) / (height / width))) < 0.2


def test_exact_sizes_by_hand():
    resize = ImageResize.from_config(ECHOINK)
    # 1280x720: 728x1288 rounded is over 200,704; scaled by sqrt(921,600 / 200,704) = 15/7: 336 x 597.3 -> 336x588,
    # 12 x 21 = 252 visual tokens (28 px per merged token), the figure for EchoInk
    assert resize.size(720, 1280) == (336, 588)
    assert resize.size(10, 10) == (56, 56)  # 28x28 < 3,136: scaled by 5.6 and rounded up
    assert resize.size(6000, 8000) == (364, 504)  # 6000/15.46 = 388.0 -> 364; 8000/15.46 = 517.3 -> 504
    assert resize.size(10, 1900) == (28, 1904)  # very wide: the short side stays one factor, as upstream


def test_an_aspect_ratio_over_200_is_refused_naming_the_file_and_null_keys_mean_no_resizing(tmp_path):
    Image.new("RGB", (402, 2)).save(tmp_path / "wide.png")
    resize = ImageResize.from_config(ECHOINK)
    with pytest.raises(DataError, match=r"item 3: image file .*wide.png is 402x2: an aspect ratio over 200"):
        load_image(str(tmp_path / "wide.png"), "item 3", resize)
    assert ImageResize.from_config({"image_min_pixels": None, "image_max_pixels": None, "image_factor": 28}) is None
    one = ImageResize.from_config({"image_min_pixels": None, "image_max_pixels": 200704, "image_factor": 28})
    assert (one.min_pixels, one.max_pixels) == (4 * 28 * 28, 200704)  # qwen-vl-utils' default minimum
    with pytest.raises(ValueError, match="data.image_min_pixels"):
        ImageResize.from_config({"image_min_pixels": 5000, "image_max_pixels": 4000, "image_factor": 28})


def test_a_1280x720_frame_gives_252_visual_tokens_through_the_processor_instead_of_1196(tmp_path):
    """The image reaches transformers' Qwen2-VL image processor (Qwen2.5-Omni's, at its published limits) already
    resized, with Pillow's default filter as qwen_omni_utils calls it; without resizing it gives 1,196 tokens."""
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((720, 1280, 3)) * 255).astype("uint8")).save(tmp_path / "frame.png")
    item = QAItem("1", "q", ["a", "b"], 0, image=str(tmp_path / "frame.png"), source="f:1")
    _, image = with_media(item, SR, 30, image_resize=ImageResize.from_config(ECHOINK))
    with Image.open(tmp_path / "frame.png") as original:
        expected = original.convert("RGB").resize((588, 336), Image.Resampling.BICUBIC)
    assert image.size == (588, 336) and np.array_equal(np.asarray(image), np.asarray(expected))
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    tokens = int(processor(images=[image], return_tensors="pt")["image_grid_thw"].prod() // 4)
    _, plain = with_media(item, SR, 30)
    plain_tokens = int(processor(images=[plain], return_tensors="pt")["image_grid_thw"].prod() // 4)
    assert (tokens, plain_tokens) == (252, 1196)


def test_the_datamodule_passes_the_image_keys():
    cfg = OmegaConf.create({"max_audio_seconds": 30, "on_error": "raise", **ECHOINK})
    assert AudioQADataModule(cfg, None, None).collate.image_resize == ImageResize(3136, 200704, 28)
    cfg = OmegaConf.create({"max_audio_seconds": 30, "on_error": "raise"})
    assert AudioQADataModule(cfg, None, None).collate.image_resize is None
