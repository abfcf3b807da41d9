"""Tiny models of every family: config -> processor -> forward pass on a real audio file, offline."""

import numpy as np
import pytest
import torch
from packaging.version import Version

from avrl.data.items import QAItem
from avrl.data.media import with_media
from avrl.models import families, load_model, load_processor
from avrl.models import multimodal as mm
from tests.support import compose, write_wav


# Audio tokens of a 1 s and a 1.5 s clip (100 mel frames per second): Qwen2-Audio's and Qwen2.5-Omni's rule is
# (frames - 1) // 2 + 1, then (x - 2) // 2 + 1; Qwen3-Omni's is 13 per 100-frame window plus three stride-2 convs
# on the rest (50 -> 25 -> 13 -> 7).
@pytest.mark.parametrize(
    "model_name, audio_tokens",
    [("tiny_qwen2_audio", [25, 37]), ("tiny_qwen2_5_omni", [25, 37]), ("tiny_qwen3_omni", [13, 20])],
)
def test_forward_on_real_audio_file_and_encoder_once_matches_transformers(tmp_path, model_name, audio_tokens):
    cfg = compose([f"model={model_name}"])
    model, processor = load_model(cfg.model).eval(), load_processor(cfg.model)
    family = families.get(cfg.model.family)
    omni = cfg.model.images  # the Omni families that avrl feeds images to
    image = None
    if omni:
        from PIL import Image

        image = tmp_path / "a.png"
        Image.fromarray((np.random.default_rng(0).random((56, 56, 3)) * 255).astype("uint8")).save(image)
    items = [
        QAItem(
            id=str(i),
            question=f"Question {i}?",
            choices=["a", "b"],
            answer_index=0,
            audio=str(write_wav(tmp_path / f"{i}.wav", seconds=1.0 + 0.5 * i, freq=300 * (i + 1))),
            image=str(image) if image else None,
        )
        for i in range(2)
    ]
    loaded = [with_media(it, processor.sampling_rate, 30) for it in items]
    prompts = [processor.render(it.question, True, omni) for it, _ in loaded]
    batch = processor(prompts, [it.waveform for it, _ in loaded], [im for _, im in loaded] if omni else None)
    n_audio = (batch["input_ids"] == processor.audio_token_id).sum(-1).tolist()
    assert n_audio == audio_tokens
    with torch.no_grad():
        reference = model(**batch).logits
        embeds = mm.embed(model, batch["input_ids"], mm.encode_media(model, family, batch))
        ours = mm.forward_logits(model, family, batch["input_ids"], batch["attention_mask"], embeds, batch)
    valid = batch["attention_mask"].bool()
    assert torch.isfinite(reference).all()
    assert torch.allclose(ours[valid], reference[valid], atol=1e-5)


def test_loader_freezes_audio_encoder_and_sets_hidden_size():
    cfg = compose(["model=tiny_qwen2_5_omni", "model.freeze_audio_encoder=true"])
    model = load_model(cfg.model)
    assert not any(p.requires_grad for p in model.model.audio_tower.parameters())
    assert not any(p.requires_grad for p in model.model.visual.parameters())  # frozen by default
    assert any(p.requires_grad for p in model.model.language_model.parameters())
    assert model.config.hidden_size == model.config.text_config.hidden_size  # for DeepSpeed's "auto" sizes


def test_tiny_builder_round_trip(tmp_path):
    from avrl.models.tiny import build

    path = build(tmp_path / "tiny", "qwen2_audio")
    cfg = compose([f"model.name_or_path={path}"])
    processor = load_processor(cfg.model)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|AUDIO|>") != tok.unk_token_id
    text = processor.render("Is it high?")
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nIs it high?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(tok(text)["input_ids"]) == text
    assert load_model(cfg.model).config.audio_config.max_source_positions == 100


# A second model built under ZeRO-3 in one process (the reference model; the next run of a local sweep), with the
# language model's modeling module first imported inside DeepSpeed's zero.Init. {mutate} drops avrl's workaround.
TWO_ZERO3_MODELS = """
import os, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, torch
from transformers.integrations import HfDeepSpeedConfig
import avrl.models.loading as loading
from tests.support import compose
deepspeed.init_distributed("gloo", verbose=False)
keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
if {mutate}:
    loading.import_modeling_modules = lambda config: None
assert "transformers.models.qwen2.modeling_qwen2" not in sys.modules
first, second = (loading.load_model(compose(["model=tiny_qwen2_audio"]).model) for _ in range(2))
with deepspeed.zero.GatheredParameters(list(second.parameters())):
    print("logits", tuple(second(input_ids=torch.tensor([[1, 2, 3]])).logits.shape))
"""


@pytest.mark.parametrize("mutate", [False, True], ids=["avrl", "without_the_workaround"])
def test_a_second_model_built_under_zero3_runs_forward(mutate):
    """DeepSpeed <= 0.19.8 put back the undecorated __init__ of classes first imported inside zero.Init, so with
    transformers 5.25's kernels decorators the second model's attention failed ('_kernel_funcs'). The mutation
    shows the case reproduces the fault; on a newer DeepSpeed that has fixed it, it says the workaround can go."""
    deepspeed = pytest.importorskip("deepspeed")
    import subprocess
    import sys

    from tests.support import ROOT, cli_env

    out = subprocess.run(
        [sys.executable, "-c", TWO_ZERO3_MODELS.replace("{mutate}", str(mutate))],
        cwd=ROOT,
        env=cli_env(pythonpath=ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if mutate and out.returncode == 0 and Version(deepspeed.__version__) > Version("0.19.8"):
        pytest.skip(f"DeepSpeed {deepspeed.__version__} no longer needs loading.import_modeling_modules: remove it")
    if mutate:
        assert out.returncode != 0 and "_kernel_funcs" in out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    else:
        assert out.returncode == 0 and "logits (1, 3, 510)" in out.stdout, out.stderr[-3000:]
