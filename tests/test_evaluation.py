"""task=eval: MMAU-format predictions, scored as MMAU's script scores them, deterministic."""

import json

import pytest
import torch

from avrl.evaluation import evaluate
from tests.support import SHARED, write_wav
from tests.support.helpers import mmau_reference as mmau_string_match


def mmau_subset(tmp_path, n=12):
    records = json.loads((SHARED / "data/mmau-test-mini.json").read_text())[:n]
    for i, r in enumerate(records):
        write_wav(tmp_path / "mmau" / r["audio_id"], seconds=0.5 + 0.1 * i, freq=200 + 50 * i)
    path = tmp_path / "mmau/mmau-test-mini.json"
    path.write_text(json.dumps(records))
    return path, records


def official_score(predictions):
    """What MMAU's evaluation.py computes: string_match(answer, model_output, choices) per item."""
    return sum(mmau_string_match(p["model_output"], p["answer"], p["choices"]) for p in predictions) / len(predictions)


@pytest.mark.skipif(not (SHARED / "data/mmau-test-mini.json").exists(), reason="needs ../shared beside the checkout")
def test_eval_on_mmau_writes_scorable_predictions_deterministically(cfg_factory, tmp_path):
    path, records = mmau_subset(tmp_path)
    metrics = []
    for run in ("a", "b"):
        cfg = cfg_factory(
            "task=eval",
            "data=mmau",
            f"data.test_path={path}",
            "data.eval_batch_size=5",
            f"output_dir={tmp_path}/{run}",
            "eval.max_new_tokens=12",
        )
        metrics.append(evaluate(cfg))
    first = json.loads((tmp_path / "a/predictions.json").read_text())
    second = json.loads((tmp_path / "b/predictions.json").read_text())
    assert first == second  # greedy evaluation is deterministic
    assert len(first) == len(records)
    for pred, rec in zip(first, records):
        assert {k: pred[k] for k in rec} == rec  # the input item, unchanged
        assert isinstance(pred["model_output"], str) and isinstance(pred["model_raw_output"], str)
    assert metrics[0]["eval/accuracy"] == pytest.approx(official_score(first))
    tasks = {r["task"] for r in records}
    assert {f"eval/accuracy/{t}" for t in tasks} <= set(metrics[0])


def test_eval_of_trained_folder_and_sampling_spread(cfg_factory, tmp_path):
    from avrl.models.tiny import build

    folder = build(tmp_path / "tiny", "qwen2_audio")
    cfg = cfg_factory(
        "task=eval",
        f"ckpt_path={folder}",
        "data.test_size=6",
        "eval.do_sample=true",
        "eval.num_samples=3",
        "eval.max_new_tokens=8",
        "logger=none",
    )
    metrics = evaluate(cfg)
    assert {"eval/accuracy", "eval/accuracy_mean", "eval/accuracy_std"} <= set(metrics)
    predictions = json.loads((tmp_path / "out/predictions.json").read_text())
    assert len(predictions) == 6 and all(len(p["model_raw_outputs"]) == 3 for p in predictions)


def test_eval_rejects_missing_checkpoint(cfg_factory, tmp_path):
    cfg = cfg_factory("task=eval", f"ckpt_path={tmp_path}/nope.ckpt", "data.test_size=2", "logger=none")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        evaluate(cfg)


def test_eval_loads_the_lightning_checkpoint_weights(cfg_factory, tmp_path):
    import torch

    from avrl.evaluation import load_for_eval
    from avrl.models import load_model, load_processor
    from avrl.train import train

    common = [
        "data.val_size=4",
        "data.test_size=4",
        "algorithm.max_completion_length=10",
        "eval.max_new_tokens=10",
        "logger=none",
        "data.batch_size=2",
        "algorithm.num_generations=2",
        "trainer.enable_progress_bar=false",
    ]
    train(cfg_factory(*common, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    (ckpt,) = (tmp_path / "out/checkpoints").glob("best*.ckpt")  # step 2 = the final weights
    cfg = cfg_factory(*common, "task=eval", f"ckpt_path={ckpt}")
    policy = load_for_eval(cfg, load_processor(cfg.model))
    final = load_model(cfg.model, path=str(tmp_path / "out/final_model")).state_dict()
    base = load_model(cfg.model).state_dict()
    loaded = policy.model.state_dict()
    assert all(torch.equal(loaded[k], final[k]) for k in final)
    assert any(not torch.equal(loaded[k], base[k]) for k in base)


def test_eval_of_lora_adapters(cfg_factory, tmp_path):
    from avrl.train import train

    common = [
        "algorithm=grpo_lora",
        "data.val_size=2",
        "data.test_size=3",
        "algorithm.max_completion_length=10",
        "eval.max_new_tokens=10",
        "logger=none",
        "data.batch_size=2",
        "trainer.enable_progress_bar=false",
    ]
    train(
        cfg_factory(
            *common,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "algorithm.temperature=1.5",
            "algorithm.num_generations=4",
            "algorithm.lora.merge_on_save=true",
        )
    )
    assert (tmp_path / "out/final_model/adapter_config.json").exists()
    from avrl.models import load_model
    from tests.support import compose

    merged = load_model(compose().model, path=str(tmp_path / "out/final_model_merged"))  # a plain checkpoint
    assert not any("lora_" in k for k in merged.state_dict())
    base = load_model(compose().model).state_dict()
    assert any(not torch.equal(base[k], v) for k, v in merged.state_dict().items())  # the adapters did something
    metrics = evaluate(
        cfg_factory(*common, "task=eval", f"ckpt_path={tmp_path}/out/final_model", f"output_dir={tmp_path}/eval")
    )
    evaluate(
        cfg_factory(
            *common, "task=eval", f"ckpt_path={tmp_path}/out/final_model_merged", f"output_dir={tmp_path}/eval_merged"
        )
    )
    adapters = json.loads((tmp_path / "eval/predictions.json").read_text())
    merged_predictions = json.loads((tmp_path / "eval_merged/predictions.json").read_text())
    # Evaluating the adapters is evaluating base + adapters: the same greedy outputs as the merged weights.
    assert len(adapters) == 3
    assert [p["model_raw_output"] for p in adapters] == [p["model_raw_output"] for p in merged_predictions]
    assert metrics["eval/accuracy"] == pytest.approx(official_score(adapters))
