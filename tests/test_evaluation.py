"""task=eval: MMAU-format predictions, scored as MMAU's script scores them, deterministic."""

import collections
import itertools
import json
import shutil
import statistics
from math import nan

import pyarrow.parquet as pq
import pytest
import torch

from avrl.evaluation import evaluate
from avrl.rules import BENCHMARKS
from tests.support import SHARED, mlflow_runs, write_wav
from tests.support.helpers import mmar_record, mmau_pro_record, mmsu_record, write_jsonl, write_parquet
from tests.support.helpers import mmau_reference as mmau_string_match


def mmau_record(i):
    return {"id": f"t{i}", "audio_id": f"./test-audios/t{i}.wav", "question": "Who speaks?",
            "choices": ["Man", "Woman"], "answer": "Man", "task": "speech", "difficulty": "easy",
            "sub-category": "s"}  # fmt: skip


def mmsu_reference(rows):
    """mmsu_evaluation.py's loop, written from its text: (official accuracy, strict accuracy)."""
    correct = total = 0
    letter = None
    for r in rows:
        p = r["response"].strip().replace("\n", "")
        if p != "None" and p:
            if p[0] in "ABCD":
                letter = p[0]
            elif len(p) > 1 and p[-2] in "ABCD":
                letter = p[-2]
            else:
                continue
        choices = {"A": r.get("choice_a", ""), "B": r.get("choice_b", ""), "C": r.get("choice_c", ""),
                   "D": r.get("choice_d", "")}  # fmt: skip
        correct += bool(letter) and choices[letter] == r["answer_gt"]
        total += 1
    return correct / total if total else 0.0, correct / len(rows)


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


def test_eval_of_a_model_folder_and_sampled_metrics(cfg_factory, tmp_path, capsys):
    from avrl.config import ASSETS

    cfg = cfg_factory(
        "task=eval",
        f"ckpt_path={ASSETS / 'tiny_qwen2_audio'}",  # a transformers folder (the tiny model, warmed up)
        "data.test_size=6",
        "eval.do_sample=true",
        "eval.temperature=1.5",
        "eval.num_samples=4",
        "eval.max_new_tokens=8",
        "logger=none",
    )
    metrics = evaluate(cfg)
    want = {"eval/accuracy", "eval/accuracy_mean", "eval/accuracy_std", "eval/majority_accuracy"}
    assert want | {"eval/pass_at_1", "eval/pass_at_2", "eval/pass_at_4"} <= set(metrics)
    assert metrics["eval/pass_at_1"] == pytest.approx(metrics["eval/accuracy_mean"])  # pass@1 is the mean accuracy
    assert 0 < metrics["eval/pass_at_1"] < metrics["eval/pass_at_2"] < metrics["eval/pass_at_4"] <= 1
    predictions = json.loads((tmp_path / "out/predictions.json").read_text())
    assert len(predictions) == 6 and all(len(p["model_raw_outputs"]) == 4 for p in predictions)
    assert all(p["model_outputs"][0] == p["model_output"] for p in predictions)
    assert len({o for p in predictions for o in p["model_raw_outputs"]}) > 6  # the samples differ
    printed = capsys.readouterr().out
    assert f"pass@4: {metrics['eval/pass_at_4'] * 100:.2f}%" in printed
    assert f"Majority vote: {metrics['eval/majority_accuracy'] * 100:.2f}%" in printed


def enumerated_pass_at_k(correct: list[float], k: int) -> float:
    """pass@k by its definition: the share of the k-subsets of the n samples that hold a correct one."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(c == 1.0 for c in subset) for subset in subsets) / len(subsets)


def test_sample_metrics_against_enumerated_subsets_and_a_counted_vote():
    import random

    from avrl.scoring import majority_correct, sample_metrics

    rng = random.Random(0)
    n, results = 5, []
    for i in range(30):
        predictions = [rng.choice(["Man", "Woman", "man", None]) for _ in range(n)]
        # as a protocol judges: here "man" is accepted too (another spelling), None is wrong
        correct = [float(p in ("Man", "man")) for p in predictions]
        results.append({"correct_per_sample": correct, "predictions": predictions,
                        "majority_correct": majority_correct(predictions, correct)})  # fmt: skip
    results.append(
        {"correct_per_sample": [1.0, nan, 0.0, 0.0, 1.0], "predictions": ["Man"] * 5, "majority_correct": nan}
    )  # fmt: skip  an unscored sample: the item is left out
    metrics = sample_metrics(results, "eval")
    scored = results[:-1]
    assert sorted(k for k in metrics if "pass_at" in k) == [f"eval/pass_at_{k}" for k in (1, 2, 4, 5)]
    for k in (1, 2, 4, 5):
        want = statistics.mean(enumerated_pass_at_k(r["correct_per_sample"], k) for r in scored)
        assert metrics[f"eval/pass_at_{k}"] == pytest.approx(want, abs=1e-12)
    per_sample = [statistics.mean(r["correct_per_sample"][j] for r in scored) for j in range(n)]
    assert metrics["eval/accuracy_mean"] == pytest.approx(statistics.mean(per_sample))
    assert metrics["eval/accuracy_std"] == pytest.approx(statistics.stdev(per_sample))
    votes = []
    for r in scored:  # the most frequent answer, ties to the first given, never None while another was given
        given = [p for p in r["predictions"] if p is not None]
        counts = collections.Counter(given)
        top = [p for p in given if counts[p] == max(counts.values())][0] if given else None
        votes.append(0.0 if top is None else r["correct_per_sample"][r["predictions"].index(top)])
    assert metrics["eval/majority_accuracy"] == pytest.approx(statistics.mean(votes))


def write_generation_config(folder, values: dict):
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(config | values))


def test_checkpoint_decoding_reads_the_models_generation_config(cfg_factory, tmp_path):
    from avrl.config import ASSETS
    from avrl.evaluation import checkpoint_decoding

    own = checkpoint_decoding(str(ASSETS / "tiny_qwen2_audio"))
    # The tiny model's file sets no sampling value: generate() then uses transformers' global defaults
    # (GenerationConfig._get_default_generation_params: greedy, temperature 1.0, top_k 50, top_p 1.0, no penalty).
    assert own.values == dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0, min_p=0.0)
    assert str(ASSETS / "tiny_qwen2_audio" / "generation_config.json") in own.source
    assert "transformers' defaults for do_sample, temperature, top_p, top_k, repetition_penalty, min_p" in own.source

    folder = tmp_path / "ckpt"
    shutil.copytree(ASSETS / "tiny_qwen2_audio", folder)
    written = dict(do_sample=True, temperature=0.7, top_p=0.5, top_k=20, repetition_penalty=1.1)
    write_generation_config(folder, written)
    decoding = checkpoint_decoding(str(folder))
    assert decoding.values == written | dict(min_p=0.0)
    assert decoding.source.endswith(f"{folder}/generation_config.json; transformers' defaults for min_p")
    with pytest.raises(FileNotFoundError, match="eval.decoding=checkpoint: no generation_config.json"):
        checkpoint_decoding(str(tmp_path))


@pytest.mark.slow  # 11 s: two evaluations
def test_eval_with_checkpoint_decoding_is_eval_with_those_values(cfg_factory, tmp_path, capsys):
    from avrl.models.tiny import build

    folder = build(tmp_path / "tiny", "qwen2_audio")
    written = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3, min_p=0.05)
    write_generation_config(folder, written)
    common = ["task=eval", f"ckpt_path={folder}", "data.test_size=4", "eval.max_new_tokens=8"]
    evaluate(cfg_factory(*common, "eval.decoding=checkpoint", f"output_dir={tmp_path}/checkpoint"))
    printed = capsys.readouterr().out
    assert "eval.decoding=checkpoint: sampled decoding (temperature 0.7, top_p 0.9, top_k 20, " in printed
    assert f"repetition_penalty 1.3, min_p 0.05; {folder}/generation_config.json)" in printed
    evaluate(
        cfg_factory(*common, *(f"eval.{k}={v}" for k, v in written.items()), "logger=none", f"output_dir={tmp_path}/c")
    )
    by_checkpoint = json.loads((tmp_path / "checkpoint/predictions.json").read_text())
    by_config = json.loads((tmp_path / "c/predictions.json").read_text())
    assert [p["model_raw_output"] for p in by_checkpoint] == [p["model_raw_output"] for p in by_config]
    _, (run,) = mlflow_runs(tmp_path)
    assert run.data.params["eval_decoding.repetition_penalty"] == "1.3"
    assert run.data.params["eval_decoding.do_sample"] == "True"
    assert run.data.tags["eval_decoding"] == f"{folder}/generation_config.json"


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


def stand_in(tmp_path, name, n=6):
    """Stand-in data in the benchmark's published format, with generated audio; (data file, records)."""
    folder = tmp_path / name
    make = {"mmar": mmar_record, "mmsu": mmsu_record, "mmau_pro": mmau_pro_record}[name]
    records = [make(i) for i in range(n)]
    for i, r in enumerate(records):
        for clip in [r["audio_path"]] if isinstance(r["audio_path"], str) else r["audio_path"]:
            write_wav(folder / clip, seconds=0.5 + 0.1 * i, freq=200 + 50 * i)
    if name == "mmar":
        return write_jsonl(folder / "MMAR-meta.jsonl", records), records
    if name == "mmsu":
        (folder / "mmsu.jsonl").write_text(json.dumps(records))  # a JSON list, as MMSU's own scripts read it
        return folder / "mmsu.jsonl", records
    return write_parquet(folder / "test.parquet", records), records


@pytest.mark.parametrize("name", ["mmar", "mmsu", "mmau_pro"])
def test_eval_on_a_benchmark_writes_the_official_key_and_scores_by_its_rule(cfg_factory, tmp_path, name, capsys):
    path, records = stand_in(tmp_path, name)
    cfg = cfg_factory("task=eval", f"data={name}", f"data.test_path={path}", "data.eval_batch_size=4",
                      "eval.max_new_tokens=8", "logger=none")  # fmt: skip
    metrics = evaluate(cfg)
    rule = BENCHMARKS[name]
    official = tmp_path / "out" / rule.PREDICTIONS_FILE
    if official.suffix == ".jsonl":  # read as the official script reads it: one JSON object per line
        rows = [json.loads(line.strip()) for line in official.read_text().splitlines()]
    elif official.suffix == ".parquet":
        rows = pq.read_table(official).to_pylist()
    else:
        rows = json.loads(official.read_text())
    assert len(rows) == len(records) and all(rule.PREDICTION_KEY in r for r in rows)
    assert all({k: r[k] for k in rec} == rec for r, rec in zip(rows, records))  # the input record, unchanged
    printed = capsys.readouterr().out
    if name == "mmsu":  # an independent reading of mmsu_evaluation.py over the file
        reference = mmsu_reference(rows)
        assert metrics["eval/mmsu/accuracy"] == pytest.approx(reference[0]) and "Overall Accuracy" in printed
        assert metrics["eval/mmsu/accuracy_strict"] == pytest.approx(reference[1])
    elif name == "mmar":
        expected = sum(mmau_string_match(r["answer_prediction"], r["answer"], r["choices"]) for r in rows) / len(rows)
        assert metrics["eval/mmar/accuracy"] == pytest.approx(expected) and "Modality-wise Accuracy:" in printed
        assert {f"eval/mmar/modality/{r['modality']}" for r in rows} <= set(metrics)
    else:
        assert "NOT the official figure" in printed and "eval/mmau_pro/string_rule/accuracy" in metrics
        assert metrics["eval/mmau_pro/unscored/open"] == sum(r["category"] == "open" for r in rows)
        several = sum(len(r["audio_path"]) > 1 for r in records)
        assert several and metrics["eval/mmau_pro/audio/items_with_several_clips"] == several
        assert metrics["eval/mmau_pro/audio/truncated_items"] == 0  # 0.5-1.0 s clips, max_audio_seconds 30


def test_mmau_pro_counts_the_clips_it_cuts(cfg_factory, tmp_path):
    path, records = stand_in(tmp_path, "mmau_pro", n=8)  # item i's first clip lasts 0.5 + 0.1 i seconds
    metrics = evaluate(cfg_factory("task=eval", "data=mmau_pro", f"data.test_path={path}", "eval.max_new_tokens=4",
                                   "data.max_audio_seconds=0.75", "logger=none"))  # fmt: skip
    assert metrics["eval/mmau_pro/audio/truncated_items"] == sum(0.5 + 0.1 * i > 0.75 for i in range(len(records)))
    # the default model's (tiny Qwen2-Audio's) window is 2 s: at 30 s its clips are cut at 2 s; none is that long
    metrics = evaluate(cfg_factory("task=eval", "data=mmau_pro", f"data.test_path={path}", "eval.max_new_tokens=4",
                                   "logger=none"))  # fmt: skip
    assert metrics["eval/mmau_pro/audio/truncated_items"] == 0


def test_eval_on_answerless_mmau_test_claims_no_accuracy(cfg_factory, tmp_path, capsys):
    records = [{k: v for k, v in mmau_record(i).items() if k != "answer"} for i in range(3)]
    for r in records:
        write_wav(tmp_path / "mmau" / r["audio_id"], seconds=0.5)
    (tmp_path / "mmau").mkdir(exist_ok=True)
    (tmp_path / "mmau/mmau-test.json").write_text(json.dumps(records))
    metrics = evaluate(cfg_factory("task=eval", "data=mmau_test", f"data.test_path={tmp_path}/mmau/mmau-test.json",
                                   "eval.max_new_tokens=6", "logger=none"))  # fmt: skip
    assert not any("accuracy" in k for k in metrics)
    rows = json.loads((tmp_path / "out/predictions.json").read_text())
    assert len(rows) == 3 and all("model_output" in r for r in rows)
    assert "no accuracy claimed" in capsys.readouterr().out


def test_eval_on_several_benchmarks_in_one_call(cfg_factory, tmp_path, capsys, monkeypatch):
    """eval.benchmarks: each data option's files in its own folder, scored by its rule as a one-benchmark call
    scores it (the same model, greedy), metrics eval/<benchmark>/..., one table benchmark x category."""
    paths = {name: stand_in(tmp_path, name)[0] for name in ("mmar", "mmsu", "mmau_pro")}
    monkeypatch.setenv("MMSU_DIR", str(paths["mmsu"].parent))  # the option's own env key: mmsu.jsonl there
    common = ["task=eval", "eval.max_new_tokens=8", "logger=none"]
    cfg = cfg_factory(*common[:2], "eval.benchmarks=[mmar,mmsu,mmau_pro]",
                      f"+eval.data.mmar.test_path={paths['mmar']}", "+eval.data.mmar.eval_batch_size=4",
                      f"+eval.data.mmau_pro.test_path={paths['mmau_pro']}")  # fmt: skip
    metrics = evaluate(cfg)
    printed = capsys.readouterr().out
    for name in ("mmar", "mmsu", "mmau_pro"):
        rule = BENCHMARKS[name]
        assert (tmp_path / "out" / name / rule.PREDICTIONS_FILE).exists()
        alone = evaluate(cfg_factory(*common, f"data={name}", f"data.test_path={paths[name]}",
                                     f"output_dir={tmp_path}/alone_{name}"))  # fmt: skip
        together = json.loads((tmp_path / "out" / name / "predictions.json").read_text())
        single = json.loads((tmp_path / f"alone_{name}" / "predictions.json").read_text())
        assert together == single  # one model, loaded once, answers each benchmark as a call of its own
        official = {k: v for k, v in alone.items() if k.startswith(f"eval/{name}/")}
        assert official and all(metrics[k] == v for k, v in official.items())
        assert metrics[f"eval/{name}/protocol/accuracy"] == alone["eval/accuracy"]
    rows = json.loads((tmp_path / "out/mmar/predictions.json").read_text())
    expected = sum(mmau_string_match(r["answer_prediction"], r["answer"], r["choices"]) for r in rows) / len(rows)
    assert metrics["eval/mmar/accuracy"] == pytest.approx(expected)
    table = printed[printed.index("benchmark x category") :].splitlines()
    mmar_row = next(line for line in table if line.startswith("| mmar "))
    assert f"| {expected * 100:.2f} | {len(rows)} |" in mmar_row
    assert next(line for line in table if line.startswith("| mmau_pro (not official) "))
    assert not (tmp_path / "out/predictions.json").exists()
    client, (run,) = mlflow_runs(tmp_path)  # one run holds every benchmark's metrics and files
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")} == pytest.approx(metrics)
    for name in ("mmar", "mmsu", "mmau_pro"):
        logged = {a.path for a in client.list_artifacts(run.info.run_id, name)}
        assert f"{name}/{BENCHMARKS[name].PREDICTIONS_FILE}" in logged


def test_eval_benchmarks_names_an_unknown_option(cfg_factory):
    with pytest.raises(ValueError, match="no data option conf/data/nope.yaml"):
        evaluate(cfg_factory("task=eval", "eval.benchmarks=[nope]", "logger=none"))
