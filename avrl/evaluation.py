"""`task=eval`: deterministic, batched evaluation that writes MMAU-compatible predictions.

predictions.json is a JSON list of the input records, each with `model_output` (the final answer as the choice's
text, so MMAU's official evaluation.py scores the file unmodified) and `model_raw_output` (the whole completion).
A benchmark's data (data.format mmau, mmar, mmsu, mmau_pro) adds the key its official script reads and the file it
reads (MMSU: predictions.jsonl; MMAU-Pro: predictions.parquet), and is scored by its official rule (avrl/rules/):
metrics `eval/<benchmark>/...`, its table printed. A file without answers (MMAU test): predictions only.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig
from peft import PeftModel
from tqdm import tqdm

from avrl import spool, tracking
from avrl.atomic import write_atomic
from avrl.checkpoints import is_deepspeed_folder
from avrl.datamodule import AudioQADataModule
from avrl.models import families, load_model, load_processor
from avrl.models.lora import apply_lora
from avrl.policy import Policy
from avrl.prompts import prompt_spec
from avrl.redaction import scrub
from avrl.rules import BENCHMARKS, mmsu
from avrl.sampling import rollout_keys
from avrl.scoring import accuracy_metrics, score_batch

log = logging.getLogger(__name__)


def load_for_eval(cfg: DictConfig, processor) -> Policy:
    """The policy to evaluate: the base model; a transformers folder or LoRA adapters (`ckpt_path=<folder>`); or a
    Lightning checkpoint (`ckpt_path=<file>.ckpt`, or the folder DeepSpeed writes: its `model.*` weights). No
    reference model, no trainer. `auto` (the default, for training's resume) is the base model here."""
    ckpt = Path(cfg.ckpt_path) if cfg.ckpt_path not in (None, "auto") else None
    if ckpt is not None and not ckpt.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt} does not exist")
    if ckpt is not None and ckpt.is_dir() and (ckpt / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(load_model(cfg.model), str(ckpt))
    elif ckpt is not None and ckpt.is_dir() and not is_deepspeed_folder(ckpt):
        model = load_model(cfg.model, path=str(ckpt))
    else:
        model = load_model(cfg.model)
        if cfg.algorithm.lora:  # a LoRA run's checkpoint holds the PEFT-wrapped model's names
            model = apply_lora(model, cfg.algorithm.lora)
        if ckpt is not None:
            model.load_state_dict(checkpoint_weights(ckpt))
    return Policy(model.eval(), processor, families.get(cfg.model.family), shared_prefix=False)  # the repeated path


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The trained model's weights in a Lightning checkpoint (the module's `model.*` entries, prefix removed). From
    a DeepSpeed folder: the fp32 master weights, gathered from the ZeRO partitions by DeepSpeed's zero_to_fp32."""
    if is_deepspeed_folder(ckpt):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))  # its tag from `latest`
    else:
        # weights_only: a checkpoint is read as tensors and plain values, never as arbitrary pickled objects.
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scrub(out / ".hydra")  # the overrides Hydra saved there, secrets included
    processor, prompt = load_processor(cfg.model), prompt_spec(cfg)
    audio = cfg.eval.audio
    datamodule = AudioQADataModule(cfg.data, processor, prompt, splits=("test",), shuffle_seed=cfg.seed, audio=audio)
    datamodule.setup()
    datamodule.write_skipped(out)
    logger = tracking.make_logger(cfg)
    spool.attach(logger, out, cfg.logger.tracking_uri or "")  # a server gone mid-run: logging waits on disk
    policy = load_for_eval(cfg, processor)

    samples, protocol = int(cfg.eval.num_samples), cfg.eval.protocol
    settings = {k: cfg.eval[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k")}
    seed = cfg.algorithm.sampling_seed
    version = cfg.data.version
    log.info(
        "evaluating %s%s with protocol %s, %s decoding, up to %d new tokens%s",
        cfg.data.name,
        f" (version {version})" if version else "",
        protocol,
        "sampled" if cfg.eval.do_sample else "greedy",
        settings["max_new_tokens"],
        "" if audio == "real" else f", audio {audio}",
    )
    rows, results = [], []
    with torch.no_grad():
        for batch in tqdm(datamodule.test_dataloader(), desc="evaluating", unit="batch"):
            datamodule.skipped += batch["skipped"]  # unreadable media with data.on_error=skip
            if not batch["items"]:
                continue
            keys = (
                (lambda k, items=batch["items"]: rollout_keys(seed, 0, items, 1, draw=k))
                if cfg.eval.do_sample
                else None
            )
            scored = score_batch(policy, batch, prompt, settings, protocol=protocol, samples=samples, keys=keys)
            for item, result in zip(batch["items"], scored):
                rows.append(prediction_record(item, result, samples, cfg.data.format))
            results += scored

    rule = BENCHMARKS[cfg.data.format] if cfg.data.format in BENCHMARKS else None
    answered = any(rule.ANSWER_KEY in row for row in rows) if rule else True
    metrics = accuracy_metrics(results, "eval") if answered else {}
    report = rule.report(rows) if rule and answered else None
    if report is not None:
        metrics.update({f"eval/{rule.NAME}/{k}": v for k, v in report.metrics.items()})
    if samples > 1 and answered:
        means = [statistics.mean(r["correct_per_sample"][k] for r in results) for k in range(samples)]
        metrics["eval/accuracy_mean"] = statistics.mean(means)
        metrics["eval/accuracy_std"] = statistics.stdev(means)
    path = out / "predictions.json"
    write_atomic(path, json.dumps(rows, indent=2, ensure_ascii=False))
    official = write_official(out, rule, rows) if rule else path
    if datamodule.skipped:
        metrics["data/skipped"] = len(datamodule.skipped)
        datamodule.write_skipped(out)
    if logger is not None:
        logger.log_metrics(metrics, step=0)
        tracking.log_file(logger, path)
        if official != path:
            tracking.log_file(logger, official)
        logger.experiment.set_tag(logger.run_id, "eval_audio", audio)
        spool.finish(logger)
    if version:
        print(f"{cfg.data.name} version {version}, protocol {protocol}")
    if audio != "real":
        print(f"audio: {audio} (avrl/data/audio_controls.py)")
    if not answered:
        print(f"{cfg.data.test_path}: no answers: predictions written, no accuracy claimed")
    elif report is not None:
        print(f"{rule.NAME}, scored by its official rule (avrl/rules/{rule.NAME}.py) on {official.name}:")
        print(report.text)
        print(f"\navrl's protocol {protocol}:")
    if answered:
        print(table(results, metrics))
    print(f"\npredictions: {official}")
    return metrics


def write_official(out: Path, rule, rows: list[dict]) -> Path:
    """The predictions in the file its official script reads: a JSON list (predictions.json, written already),
    JSONL (MMSU) or a parquet (MMAU-Pro)."""
    path = out / rule.PREDICTIONS_FILE
    if path.suffix == ".jsonl":
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def prediction_record(item, result: dict, samples: int, benchmark: str = "") -> dict:
    """The input record (MMAU's, when the item came from a file) with the model's answer added, also under the
    key the benchmark's official script reads: MMAR `answer_prediction` (the same text); MMSU `response`, the
    letter of the choice the protocol predicted (MMSU's scorer reads a letter), or the prediction as is when it
    names no choice."""
    record = (
        dict(item.meta)
        if item.meta
        else {
            "id": item.id,
            "question": item.question,
            "choices": item.choices,
            "answer": item.answer,
            "task": item.category,
        }
    )
    # model_prediction: the key R1-AQA's test script writes; the same value.
    record.update(
        model_output=result["prediction"], model_prediction=result["prediction"], model_raw_output=result["completion"]
    )
    if benchmark in BENCHMARKS:
        text = result["prediction"]
        if benchmark == mmsu.NAME and text in item.choices:
            text = "ABCD"[item.choices.index(text)]
        record[BENCHMARKS[benchmark].PREDICTION_KEY] = text
    if samples > 1:
        record["model_raw_outputs"] = result["completions"]
    return record


def table(results: list[dict], metrics: dict[str, float]) -> str:
    """Accuracy by task and by difficulty, in the shape MMAU's evaluation script prints."""
    lines = []
    for key, title in (("category", "Task-wise Accuracy:"), ("difficulty", "Difficulty-wise Accuracy:")):
        names = sorted({r[key] for r in results if r.get(key) and r["correct"] == r["correct"]})  # nan: unscored
        if names:
            lines += ["*" * 30, title]
            lines += [f"{n} : {metrics[f'eval/accuracy/{n}'] * 100:.2f}%" for n in names]
    lines += ["*" * 30, f"Total Accuracy: {metrics['eval/accuracy'] * 100:.2f}%", "*" * 30]
    return "\n".join(lines)
