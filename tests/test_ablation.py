"""What an ablation needs beyond accuracy: audio-contribution controls, an out-of-distribution split, the final
model's evaluation after training, seed intervals and paired comparisons, the MLflow experiment's kind."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from avrl.data import audio_controls
from avrl.data.synthetic import CONDITIONS, QUESTIONS, SAMPLE_RATE, make_item
from avrl.sweeps import report
from tests.support import mlflow_runs


# ---------------------------------------------------------------------------------------------- audio controls
def test_muted_and_noise_keep_the_clip_length_and_level():
    clip = (0.3 * np.sin(np.linspace(0, 200, 16_000))).astype(np.float32)
    muted = audio_controls.replace_signal(clip, "muted", "a")
    assert muted.shape == clip.shape and not muted.any()
    noise = audio_controls.replace_signal(clip, "noise", "a")
    assert noise.shape == clip.shape and noise.dtype == clip.dtype
    assert math.isclose(float(np.sqrt(np.mean(noise.astype(np.float64) ** 2))), 0.3 / math.sqrt(2), rel_tol=0.02)
    assert abs(np.corrcoef(noise, clip)[0, 1]) < 0.05  # nothing of the clip is left
    assert np.array_equal(noise, audio_controls.replace_signal(clip, "noise", "a"))  # seeded by the item
    assert not np.array_equal(noise, audio_controls.replace_signal(clip, "noise", "b"))
    assert audio_controls.replace_signal(clip, "real", "a") is clip
    with pytest.raises(ValueError, match="eval.audio must be one of"):
        audio_controls.check("loud")


def test_shuffled_audio_gives_every_item_another_items_clip():
    items = [make_item(0, "val", i) for i in range(7)]
    shuffled = audio_controls.ShuffledAudio(items, seed=3)
    sources = []
    for i in range(len(items)):
        item = shuffled[i]
        assert item.question == items[i].question and item.answer_index == items[i].answer_index
        (source,) = [j for j, other in enumerate(items) if np.array_equal(other.waveform, item.waveform)]
        sources.append(source)
    assert sorted(sources) == list(range(7)) and all(s != i for i, s in enumerate(sources))


def test_eval_with_muted_audio_feeds_silence(tmp_path, monkeypatch):
    """task=eval eval.audio=muted: the model's input features are those of silence, and the run says so."""
    from avrl.datamodule import AudioQADataModule
    from avrl.models import load_processor
    from avrl.prompts import prompt_spec
    from tests.support import compose

    cfg = compose(["data.test_size=4", "data.eval_batch_size=4"])
    processor = load_processor(cfg.model)
    batches = {}
    for audio in ("real", "muted"):
        dm = AudioQADataModule(cfg.data, processor, prompt_spec(cfg), splits=("test",), audio=audio)
        dm.setup()
        batches[audio] = next(iter(dm.test_dataloader()))
    silence = processor.feature_extractor(
        [np.zeros(int(1.5 * SAMPLE_RATE), np.float32)] * 4,
        sampling_rate=SAMPLE_RATE,
        return_tensors="pt",
        return_attention_mask=True,
    )
    assert np.allclose(batches["muted"]["input_features"].numpy(), silence["input_features"].numpy())
    assert not np.allclose(batches["real"]["input_features"].numpy(), silence["input_features"].numpy())
    assert batches["muted"]["input_ids"].equal(batches["real"]["input_ids"])  # same prompt, same audio tokens


# ---------------------------------------------------------------------------------------------- OOD split
def _dominant_hz(clip: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(clip))
    return float(np.fft.rfftfreq(len(clip), 1 / SAMPLE_RATE)[spectrum.argmax()])


def test_the_ood_split_asks_about_tones_from_unseen_frequency_bands():
    for split, condition in (("val", "in"), ("ood", "ood")):
        bands = CONDITIONS[condition]
        for i in range(20):
            item = make_item(0, split, i, tasks=("pitch",))
            assert item.question == QUESTIONS["pitch"][0]
            quiet = item.waveform[:800] if item.waveform[:800].std() < 0.05 else item.waveform[-800:]
            assert quiet.std() == pytest.approx(bands["noise"], rel=0.3)  # the noise floor before or after the tone
            band = bands["high"] if item.answer == "high" else bands["low"]
            assert band[0] - 5 <= _dominant_hz(item.waveform) <= band[1] + 5, (split, i, item.answer)
    # The bands are disjoint: no OOD tone lies where training tones do.
    train, ood = CONDITIONS["in"], CONDITIONS["ood"]
    assert train["low"][1] < ood["low"][0] and ood["high"][1] < train["high"][0]


# ---------------------------------------------------------------------------------------------- final evaluation
def test_training_ends_with_the_final_models_validation_and_controls(cfg_factory):
    """max_steps not a multiple of val_check_interval: val/accuracy is also logged at the last step; the muted
    and OOD evaluations follow, with audio reliance = val - muted, and final_eval.json holds every item."""
    from avrl.train import train

    cfg = cfg_factory(
        "trainer.max_steps=3",
        "trainer.val_check_interval=2",
        "data.val_size=6",
        "data.batch_size=2",
        "algorithm.num_generations=2",
        "algorithm.max_completion_length=10",
        "trainer.enable_progress_bar=false",
        "final_eval.audio=[muted,shuffled]",
    )
    metrics = train(cfg)
    client, (run,) = mlflow_runs(cfg.logger.tracking_uri)
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy"))
    assert steps == [0, 2, 3]
    final = {
        k: run.data.metrics[k]
        for k in (
            "val/accuracy",
            "val_muted/accuracy",
            "val_shuffled/accuracy",
            "val_ood/accuracy",
            "val/audio_reliance",
        )
    }
    assert final["val/audio_reliance"] == pytest.approx(final["val/accuracy"] - final["val_muted/accuracy"])
    assert metrics["val/accuracy"] == final["val/accuracy"] and metrics["val_ood/accuracy"] == final["val_ood/accuracy"]
    per_item = json.loads((Path(cfg.output_dir) / "final_eval.json").read_text())
    assert set(per_item) == {"val", "val_muted", "val_shuffled", "val_ood"}
    assert all(len(per_item[k]) == 6 for k in per_item)
    assert set(per_item["val"]) == set(per_item["val_muted"]) and not set(per_item["val"]) & set(per_item["val_ood"])
    assert np.mean(list(per_item["val_ood"].values())) == pytest.approx(final["val_ood/accuracy"])
    assert "final_eval.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


# ---------------------------------------------------------------------------------------------- report statistics
def test_seed_interval_is_students_t():
    mean, half = report.mean_interval([0.70, 0.80, 0.75])
    # t(0.975, 2) = 4.303 (tables); s = 0.05
    assert mean == pytest.approx(0.75) and half == pytest.approx(4.303 * 0.05 / math.sqrt(3), rel=1e-3)
    assert report.mean_interval([0.5]) == (0.5, None)


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    a = {str(i): float(v) for i, v in enumerate(rng.random(200) < 0.5)}
    same = report.paired_bootstrap([a], [dict(a)])
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0 and not same["significant"]
    better = {k: 1.0 for k in a}  # b right on every item
    result = report.paired_bootstrap([a], [better])
    assert result["difference"] == pytest.approx(1 - np.mean(list(a.values()))) and result["significant"]
    noisy = {k: float(v) for k, v in zip(a, rng.random(200) < 0.5, strict=True)}  # unrelated coin flips
    result = report.paired_bootstrap([a], [noisy])
    d = np.array([noisy[k] - a[k] for k in a])
    normal = 1.96 * d.std(ddof=1) / math.sqrt(len(d))  # the normal approximation's half-width
    assert result["items"] == 200 and result["difference"] == pytest.approx(d.mean())
    assert (result["high"] - result["low"]) / 2 == pytest.approx(normal, rel=0.1)


def test_the_comparison_interval_holds_the_seed_to_seed_variation():
    """Arm b learns on two seeds of three (the third stays at a's level): resampling seeds widens the interval
    beyond what the items alone give for the same seed-averaged numbers."""
    rng = np.random.default_rng(1)
    a = {str(i): float(v) for i, v in enumerate(rng.random(100) < 0.5)}
    learnt = {k: 1.0 for k in a}
    b_runs = [learnt, learnt, dict(a)]
    two_level = report.paired_bootstrap([a, a, a], b_runs)
    averaged = {k: float(np.mean([r[k] for r in b_runs])) for k in a}
    items_only = report.paired_bootstrap([a], [averaged])
    assert two_level["difference"] == pytest.approx(items_only["difference"])
    assert two_level["seeds"] == [3, 3]
    assert (two_level["high"] - two_level["low"]) > 2 * (items_only["high"] - items_only["low"])


# ---------------------------------------------------------------------------------------------- the tiny base
@pytest.mark.parametrize("prompt", ["no_think", "think", "echoink"])
def test_the_tiny_base_answers_every_shipped_format_at_chance(prompt):
    """Every arm of the embedded sweeps starts from the same base: it writes each prompt's answer format and has
    not learnt to listen (greedy on 32 val items: format 1.0, accuracy far from 1)."""
    import torch

    from avrl.datamodule import AudioQADataModule
    from avrl.models import families, load_model, load_processor
    from avrl.policy import Policy
    from avrl.prompts import prompt_spec
    from avrl.scoring import accuracy_metrics, score_batch
    from avrl.train import reward_functions
    from tests.support import compose

    cfg = compose([f"prompt={prompt}", "data.val_size=32", "data.eval_batch_size=32"])
    processor, spec = load_processor(cfg.model), prompt_spec(cfg)
    dm = AudioQADataModule(cfg.data, processor, spec, splits=("val",))
    dm.setup()
    policy = Policy(load_model(cfg.model).eval(), processor, families.get(cfg.model.family), shared_prefix=False)
    settings = dict(max_new_tokens=cfg.algorithm.max_completion_length, temperature=1.0, top_p=1.0, top_k=0)
    with torch.no_grad():
        results = score_batch(
            policy, next(iter(dm.val_dataloader())), spec, settings, format_reward=reward_functions(cfg)[0]["format"]
        )
    metrics = accuracy_metrics(results, "val")
    assert metrics["val/format"] == 1.0
    assert 0.2 <= metrics["val/accuracy"] <= 0.8


def test_a_prompt_mix_shows_each_training_item_in_one_format_and_sft_follows_it():
    from avrl.algorithms.sft import SFTModule
    from avrl.datamodule import AudioQADataModule
    from avrl.models import load_processor
    from avrl.prompts import prompt_mix, prompt_spec
    from tests.support import compose

    cfg = compose(["algorithm=sft", "data.prompt_mix=[no_think,think]", "data.batch_size=16"])
    processor, spec = load_processor(cfg.model), prompt_spec(cfg)
    mix = prompt_mix(cfg)
    assert [s.name for s in mix] == ["no_think", "think"]
    dm = AudioQADataModule(cfg.data, processor, spec, splits=("train", "val"), prompt_mix=mix)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    names = [s.name for s in batch["prompt_specs"]]
    assert set(names) == {"no_think", "think"}
    for text, name in zip(batch["prompts"], names, strict=True):
        assert ("Output the thinking process" in text) == (name == "think")
    module = SFTModule(model_cfg=cfg.model, algorithm=cfg.algorithm, optim=cfg.optim, processor=processor, prompt=spec)
    ids, mask = module.targets(batch["items"], batch["prompt_specs"])
    for row, (item, s) in enumerate(zip(batch["items"], batch["prompt_specs"], strict=True)):
        text = processor.tokenizer.decode(ids[row][mask[row].bool()][:-1])
        assert text == s.sft_target.format(answer=item.answer)
    assert "prompt_specs" not in next(iter(dm.val_dataloader()))  # validation keeps the run's prompt


# ---------------------------------------------------------------------------------------------- the toy world's shifts
def _tone_seconds(clip: np.ndarray, floor: float) -> float:
    """How long the clip rises above its noise floor (10 ms windows whose RMS exceeds 10x the floor)."""
    windows = clip[: len(clip) // 160 * 160].reshape(-1, 160)
    return float((np.sqrt((windows.astype(np.float64) ** 2).mean(axis=1)) > 10 * floor).sum() * 0.01)


def test_each_shift_changes_only_what_it_names():
    from avrl.data.synthetic import PARAPHRASES, SHIFTS

    assert SHIFTS == ("band_outside", "duration", "noise", "wording")
    for i in range(20):
        item = make_item(0, "ood_band_outside", i, tasks=("pitch",))
        band = (80, 180) if item.answer == "low" else (3500, 6000)
        assert band[0] - 5 <= _dominant_hz(item.waveform) <= band[1] + 5
        assert item.question == QUESTIONS["pitch"][0]

        short = make_item(0, "ood_duration", i, tasks=("pitch",))
        assert 0.13 <= _tone_seconds(short.waveform, 0.003) <= 0.31
        band = CONDITIONS["in"]["low"] if short.answer == "low" else CONDITIONS["in"]["high"]
        assert band[0] - 10 <= _dominant_hz(short.waveform) <= band[1] + 10
        trained = make_item(0, "val", i, tasks=("pitch",))
        assert 0.85 <= _tone_seconds(trained.waveform, 0.003) <= 0.92  # 0.9 s in training

        noisy = make_item(0, "ood_noise", i, tasks=("pitch",))
        quiet = noisy.waveform[:800] if abs(noisy.waveform[:800].std() - 0.05) < 0.02 else noisy.waveform[-800:]
        assert quiet.std() == pytest.approx(0.05, rel=0.2)

        worded = make_item(0, "ood_wording", i, tasks=("pitch",))
        assert worded.question in PARAPHRASES["pitch"] and sorted(worded.choices) == ["high", "low"]
    assert len({make_item(0, "ood_wording", i, tasks=("pitch",)).question for i in range(30)}) == 3


def test_the_shifts_leave_the_existing_splits_as_they_were():
    """Every split that existed before the shifts: the same items as the module at the commit before them."""
    import importlib.util
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run(["git", "show", "8b62fda:avrl/data/synthetic.py"], cwd=root, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip("the commit before the shifts is not in this clone (a shallow one)")
    old = shown.stdout
    spec = importlib.util.spec_from_loader("synthetic_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_before"] = module
    exec(compile(old, "synthetic_before.py", "exec"), module.__dict__)
    for split in ("train", "val", "test", "ood"):
        for i in range(12):
            a = make_item(0, split, i, tasks=("pitch", "loudness", "count", "order"))
            b = module.make_item(0, split, i, tasks=("pitch", "loudness", "count", "order"))
            assert (a.question, a.choices, a.answer_index) == (b.question, b.choices, b.answer_index)
            assert np.array_equal(a.waveform, b.waveform)
