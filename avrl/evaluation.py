"""`task=eval`: deterministic, batched evaluation that writes MMAU-compatible predictions.

predictions.json is a JSON list of the input records, each with `model_output` (the final answer as the choice's
text, so MMAU's official evaluation.py scores the file unmodified) and `model_raw_output` (the whole completion).
A benchmark's data (data.format mmau, mmar, mmsu, mmau_pro) adds the key its official script reads and the file it
reads (MMSU: predictions.jsonl; MMAU-Pro: predictions.parquet), and is scored by its official rule (avrl/rules/):
metrics `eval/<benchmark>/...`, its table printed. A file without answers (MMAU test): predictions only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from peft import PeftModel
from tqdm import tqdm
from transformers import GenerationConfig

from avrl import spool, tracking
from avrl.checkpoints import is_deepspeed_folder
from avrl.datamodule import AudioQADataModule
from avrl.models import families, load_model, load_processor
from avrl.models.lora import apply_lora
from avrl.policy import Policy
from avrl.prompts import prompt_spec
from avrl.redaction import scrub
from avrl.rules import BENCHMARKS, mmau_pro
from avrl.sampling import rollout_keys
from avrl.scoring import (
    BenchmarkScore,
    accuracy_metrics,
    audio_coverage,
    benchmark_config,
    benchmark_score,
    benchmark_table,
    prediction_record,
    rule_options,
    sample_metrics,
    score_batch,
    write_predictions,
)

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
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional extra

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))  # its tag from `latest`
    else:
        # weights_only: a checkpoint is read as tensors and plain values, never as arbitrary pickled objects.
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """task=eval on `data` (one benchmark: files and metrics as the module docstring says) or, with
    `eval.benchmarks=[mmau,mmar,...]`, on each of those data options in turn with the model loaded once: each
    one's files in <output_dir>/<benchmark>/, metrics `eval/<benchmark>/...` in one MLflow run, and one table
    benchmark x category printed at the end."""
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scrub(out / ".hydra")  # the overrides Hydra saved there, secrets included
    names = list(cfg.eval.benchmarks) if "benchmarks" in cfg.eval else []
    if len(set(names)) != len(names):
        raise ValueError(f"eval.benchmarks={names}: a benchmark named twice")
    runs = [(name, benchmark_config(cfg, name)) for name in names] or [(None, cfg)]  # every config before the model
    processor = load_processor(cfg.model)
    logger = tracking.make_logger(cfg)
    spool.attach(logger, out, cfg.logger.tracking_uri or "")  # a server gone mid-run: logging waits on disk
    policy = load_for_eval(cfg, processor)
    decoding = eval_decoding(cfg)
    if logger is not None:
        for key, value in decoding.values.items():
            logger.experiment.log_param(logger.run_id, f"eval_decoding.{key}", value)
    metrics: dict[str, float] = {}
    scores = []
    for name, run_cfg in runs:
        score = evaluate_one(run_cfg, policy, processor, out / name if name else out, logger, name, decoding=decoding)
        metrics.update(score.metrics)
        scores.append(score)
    if logger is not None:
        logger.log_metrics(metrics, step=0)
        logger.experiment.set_tag(logger.run_id, "eval_audio", cfg.eval.audio)
        if names:
            logger.experiment.set_tag(logger.run_id, "eval_benchmarks", ",".join(names))
        spool.finish(logger)
    if names:
        print(f"\nbenchmark x category (%), protocol {cfg.eval.protocol}; each benchmark's official figure:")
        print(benchmark_table(scores))
    return metrics


def evaluate_one(
    cfg: DictConfig, policy: Policy, processor, out: Path, logger, name: str | None, *, decoding: Decoding | None = None
) -> BenchmarkScore:
    """One data option: its predictions written to `out`, scored, its table printed, its files logged. `name`
    (a benchmark of eval.benchmarks): metrics under eval/<name>/ and artifacts under <name>/; None (task=eval on
    `data`): avrl's protocol as eval/accuracy and the official rule as eval/<rule>/... `decoding`: the
    generation settings (`eval_decoding`; None: resolved here from cfg, and printed)."""
    prompt, audio = prompt_spec(cfg), cfg.eval.audio
    datamodule = AudioQADataModule(cfg.data, processor, prompt, splits=("test",), shuffle_seed=cfg.seed, audio=audio)
    datamodule.setup()
    datamodule.write_skipped(out)
    samples, protocol = int(cfg.eval.num_samples), cfg.eval.protocol
    decoding = decoding or eval_decoding(cfg)
    settings, do_sample = decoding.settings(cfg.eval.max_new_tokens), decoding.values["do_sample"]
    if samples > 1 and not do_sample:
        log.warning("eval.num_samples=%d with greedy decoding: %d identical completions per item", samples, samples)
    if logger is not None:  # tags (params are written once): a sweep over checkpoints calls this per checkpoint
        logger.experiment.set_tag(logger.run_id, "eval_decoding", decoding.source)
        for key, value in decoding.values.items():
            logger.experiment.set_tag(logger.run_id, f"eval_decoding.{key}", value)
    seed = cfg.algorithm.sampling_seed
    version = cfg.data.version
    log.info(
        "evaluating %s%s with protocol %s, %s, up to %d new tokens%s",
        cfg.data.name,
        f" (version {version})" if version else "",
        protocol,
        decoding.describe(),
        settings["max_new_tokens"],
        "" if audio == "real" else f", audio {audio}",
    )
    rows, results, items = [], [], []
    with torch.no_grad():
        for batch in tqdm(datamodule.test_dataloader(), desc=f"evaluating {cfg.data.name}", unit="batch"):
            datamodule.skipped += batch["skipped"]  # unreadable media with data.on_error=skip
            if not batch["items"]:
                continue
            keys = (lambda k, items=batch["items"]: rollout_keys(seed, 0, items, 1, draw=k)) if do_sample else None
            scored = score_batch(policy, batch, prompt, settings, protocol=protocol, samples=samples, keys=keys)
            for item, result in zip(batch["items"], scored):
                rows.append(prediction_record(item, result, samples, cfg.data.format))
            results += scored
            items += batch["items"]

    rule = BENCHMARKS[cfg.data.format] if cfg.data.format in BENCHMARKS else None
    if name is None:  # one benchmark: avrl's protocol as eval/accuracy, the official rule beside it
        score = benchmark_score(
            cfg.data.format, cfg.data.format, rows, results, f"eval/{rule.NAME}" if rule else "eval"
        )
        if score.answered:
            score.metrics.update(accuracy_metrics(results, "eval"))
            score.metrics = {
                k: v for k, v in score.metrics.items() if not k.startswith(f"eval/{cfg.data.format}/protocol")
            }
        protocol_prefix = "eval"
    else:
        score = benchmark_score(name, cfg.data.format, rows, results, f"eval/{name}", rule_options(cfg))
        protocol_prefix = f"eval/{name}/protocol" if rule else f"eval/{name}"
    metrics = score.metrics
    if samples > 1 and score.answered:
        metrics.update(sample_metrics(results, protocol_prefix))
    if cfg.data.format == mmau_pro.NAME:  # every clip is heard; a clip past what the family encodes is cut, counted
        heard = processor.heard_seconds(cfg.data.max_audio_seconds)
        coverage = audio_coverage(items, heard)
        metrics.update({f"eval/{name or mmau_pro.NAME}/audio/{k}": float(v) for k, v in coverage.items()})
        print(
            f"audio: {coverage['items_with_several_clips']} items with several clips (all heard, in order), "
            f"{coverage['truncated_items']} items with a clip cut at {heard:g} s (data.max_audio_seconds="
            f"{cfg.data.max_audio_seconds:g}; this model family hears "
            + (
                "whole clips up to it)"
                if processor.family.long_audio
                else f"at most its {processor.window_seconds:g} s window)"
            )
            + (f", {coverage['unknown_length']} clips of unknown length" if coverage["unknown_length"] else "")
        )
    path, official = write_predictions(out, rule, rows)
    if datamodule.skipped:
        metrics["data/skipped" if name is None else f"data/{name}/skipped"] = len(datamodule.skipped)
        datamodule.write_skipped(out)
    if logger is not None:
        tracking.log_file(logger, path, name)
        if official != path:
            tracking.log_file(logger, official, name)
    if name is not None:
        print(f"\n=== {name} ({cfg.data.test_path})")
    if version:
        print(f"{cfg.data.name} version {version}, protocol {protocol}")
    if audio != "real":
        print(f"audio: {audio} (avrl/data/audio_controls.py)")
    print(f"{decoding.describe()}, up to {settings['max_new_tokens']} new tokens, {samples} sample(s) per item")
    if not score.answered:
        print(f"{cfg.data.test_path}: no answers: predictions written, no accuracy claimed")
    elif rule is not None:
        print(f"{rule.NAME}, scored by its official rule (avrl/rules/{rule.NAME}.py) on {official.name}:")
        print(score.text)
        print(f"\navrl's protocol {protocol}:")
    if score.answered:
        print(table(results, metrics, protocol_prefix))
    print(f"\npredictions: {official}")
    return score


def table(results: list[dict], metrics: dict[str, float], prefix: str = "eval") -> str:
    """Accuracy by task and by difficulty, in the shape MMAU's evaluation script prints."""
    lines = []
    for key, title in (("category", "Task-wise Accuracy:"), ("difficulty", "Difficulty-wise Accuracy:")):
        names = sorted({r[key] for r in results if r.get(key) and r["correct"] == r["correct"]})  # nan: unscored
        if names:
            lines += ["*" * 30, title]
            lines += [f"{n} : {metrics[f'{prefix}/accuracy/{n}'] * 100:.2f}%" for n in names]
    lines += ["*" * 30, f"Total Accuracy: {metrics[f'{prefix}/accuracy'] * 100:.2f}%", "*" * 30]
    if f"{prefix}/accuracy_mean" in metrics:  # eval.num_samples > 1 (Total: the first sample's)
        lines += [
            f"Accuracy over samples: {metrics[f'{prefix}/accuracy_mean'] * 100:.2f}% "
            f"± {metrics[f'{prefix}/accuracy_std'] * 100:.2f} (sd)",
            f"Majority vote: {metrics[f'{prefix}/majority_accuracy'] * 100:.2f}%",
        ]
        at = f"{prefix}/pass_at_"
        passes = sorted((int(k.removeprefix(at)), v) for k, v in metrics.items() if k.startswith(at))
        lines += [f"pass@{k}: {v * 100:.2f}%" for k, v in passes] + ["*" * 30]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ decoding
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "min_p")
OFF = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "min_p": 0.0}


@dataclass(frozen=True)
class Decoding:
    """How task=eval generates: `values` (do_sample and the five sampling settings) and where they come from
    (`source`: the eval config, or the generation_config.json read)."""

    values: dict
    source: str

    def settings(self, max_new_tokens: int) -> dict:
        """Policy.generate's settings (max_new_tokens is always eval.max_new_tokens)."""
        return {"max_new_tokens": max_new_tokens} | {k: v for k, v in self.values.items() if k != "do_sample"}

    def describe(self) -> str:
        v = self.values
        if not v["do_sample"]:
            penalty = f"repetition_penalty {v['repetition_penalty']:g}; " if v["repetition_penalty"] != 1.0 else ""
            return f"greedy decoding ({penalty}{self.source})"
        shown = ", ".join(f"{k} {v[k]:g}" for k in SAMPLING_KEYS[1:])
        return f"sampled decoding ({shown}; {self.source})"


def eval_decoding(cfg: DictConfig) -> Decoding:
    """task=eval's decoding: eval.decoding=config, eval's own keys; eval.decoding=checkpoint, the evaluated model's
    generation_config.json (`checkpoint_decoding`), printed with the file it came from."""
    if cfg.eval.decoding == "config":
        values = {k: cfg.eval[k] for k in SAMPLING_KEYS}
        return Decoding(_typed(values), "eval config")
    if cfg.eval.decoding != "checkpoint":
        raise ValueError(f"eval.decoding must be config or checkpoint, got {cfg.eval.decoding!r}")
    decoding = checkpoint_decoding(generation_config_source(cfg))
    print(f"eval.decoding=checkpoint: {decoding.describe()}")
    return decoding


def generation_config_source(cfg: DictConfig) -> str:
    """Whose generation_config.json the checkpoint decoding reads: the evaluated folder's (ckpt_path a transformers
    or adapters folder that has one), else the base model's (model.name_or_path: a folder or a hub name)."""
    ckpt = Path(cfg.ckpt_path) if cfg.ckpt_path not in (None, "auto") else None
    if ckpt is not None and ckpt.is_dir() and (ckpt / "generation_config.json").exists():
        return str(ckpt)
    return str(cfg.model.name_or_path)


def checkpoint_decoding(source: str) -> Decoding:
    """The decoding a model's generation_config.json asks for, read by transformers.GenerationConfig: a value the
    file leaves unset takes what generate() would use, transformers' global default (e.g. top_k 50), and min_p
    unset is off. The source names the file and which values were defaults."""
    try:
        config = GenerationConfig.from_pretrained(source)
    except OSError as e:
        raise FileNotFoundError(
            f"eval.decoding=checkpoint: no generation_config.json in {source} (the ckpt_path folder's, else "
            f"model.name_or_path's)"
        ) from e
    defaults = GenerationConfig._get_default_generation_params()  # what generate() fills unset values with
    unset = [key for key in SAMPLING_KEYS if getattr(config, key, None) is None]
    values = {key: defaults.get(key, OFF[key]) if key in unset else getattr(config, key) for key in SAMPLING_KEYS}
    where = Path(source) / "generation_config.json" if Path(source).is_dir() else f"{source}: generation_config.json"
    note = f"; transformers' defaults for {', '.join(unset)}" if unset else ""
    return Decoding(_typed(values), f"{where}{note}")


def _typed(values: dict) -> dict:
    """The decoding values as the sampler takes them (a top_k of None: off)."""
    return {
        "do_sample": bool(values["do_sample"]),
        "temperature": float(values["temperature"]),
        "top_p": float(values["top_p"]),
        "top_k": int(values["top_k"] or 0),
        "repetition_penalty": float(values["repetition_penalty"]),
        "min_p": float(values["min_p"] or 0.0),
    }
