"""Scoring completions against the answers: the one path that validation (during training) and task=eval share,
and the one metrics function both report with; the benchmarks' predictions files and official scores, which
task=eval and the final evaluation after training share (a benchmark's data option composed inside a run, its
records written under the key its official script reads, scored by its rule, the benchmark x category table)."""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from math import nan
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from avrl.atomic import write_atomic
from avrl.config import CONF
from avrl.measures import majority_vote, pass_at_k_metrics, sample_accuracy
from avrl.policy import Policy
from avrl.prompts import PromptSpec
from avrl.protocols import prediction
from avrl.rules import BENCHMARKS, mmau_pro, mmsu
from avrl.schemas import DataConfig


def score_batch(
    policy: Policy,
    batch: dict,
    prompt: PromptSpec,
    settings: dict,
    *,
    protocol: str = "strict",
    samples: int = 1,
    keys: Callable[[int], list[int]] | None = None,
    format_reward=None,
) -> list[dict]:
    """Complete each prompt `samples` times (greedy when `keys` is None, else sample k drawn from the streams
    `keys(k)`) and judge every completion by `protocol` (avrl/protocols.py). One result per item; its "correct",
    "prediction", "completion" and "format" are the first sample's, "correct_per_sample" and "predictions" hold
    them all, "majority_correct" the majority vote's (`majority_correct`).

    The k samples are one generate call with k completions per prompt, through the shared-prefix decoding (each
    prompt prefilled once, its cache copied to the k rows); sample k of an item is drawn from the same stream
    `keys(k)` names as a call per sample would draw it."""
    media = policy.encode(batch)  # once for all samples
    if samples > 1:
        rows = None
        if keys is not None:
            per_sample = [keys(k) for k in range(samples)]
            rows = [per_sample[k][i] for i in range(len(batch["items"])) for k in range(samples)]
        ids, mask = replace(policy, shared_prefix=True).generate(batch, media, samples, settings, keys=rows)
        flat = policy.decode(ids, mask)
        texts = [flat[k::samples] for k in range(samples)]  # texts[k][i]: sample k of item i
    else:
        ids, mask = policy.generate(batch, media, 1, settings, keys=keys(0) if keys is not None else None)
        texts = [policy.decode(ids, mask)]
    results = []
    for i, item in enumerate(batch["items"]):
        completions = [t[i] for t in texts]
        judged = [prediction(protocol, prompt, c, item) for c in completions]  # each completion parsed once
        correct = [nan if c is None else float(c) for _, c in judged]
        results.append(
            {
                "id": item.id,
                "category": item.category,
                "difficulty": item.difficulty,
                "correct": correct[0],  # nan: not scored
                "correct_per_sample": correct,
                "prediction": judged[0][0],
                "predictions": [p for p, _ in judged],
                "majority_correct": majority_correct([p for p, _ in judged], correct),
                "completion": completions[0],
                "completions": completions,
                "format": format_reward([completions[0]], [item], prompt)[0] if format_reward else float("nan"),
            }
        )
    return results


def majority_correct(predictions: list, correct: list[float]) -> float:
    """Whether the answer most samples give is right, judged as the protocol judged the samples that gave it (a
    protocol may accept more than one spelling of the answer, so the vote is not compared with the gold text):
    the correctness of the first sample with the majority answer (measures.majority_vote: ties to the first, None
    never wins unless no sample answered; then 0). nan when the item is not scored."""
    if any(c != c for c in correct):
        return nan
    vote = majority_vote(predictions)
    return 0.0 if vote is None else correct[predictions.index(vote)]


def sample_metrics(results: list[dict], prefix: str) -> dict[str, float]:
    """Over k > 1 samples per item, on the items with every sample scored: `<prefix>/accuracy_mean` and
    `accuracy_std` (over the k samples' accuracies, sd with ddof=1), `<prefix>/majority_accuracy` and
    `<prefix>/pass_at_<k>` (pass@k, the unbiased estimator; MLflow takes no "@" in a name) for k = 1, 2, 4, ...
    and k = samples."""
    scored = [r for r in results if all(c == c for c in r["correct_per_sample"])]
    if not scored:
        return {}
    samples = len(scored[0]["correct_per_sample"])
    mean, sd = sample_accuracy([r["correct_per_sample"] for r in scored])
    metrics = {f"{prefix}/accuracy_mean": mean, f"{prefix}/accuracy_std": sd}
    metrics[f"{prefix}/majority_accuracy"] = sum(r["majority_correct"] for r in scored) / len(scored)
    metrics.update(pass_at_k_metrics(scored, pass_at_k_sizes(samples), prefix))
    return metrics


def pass_at_k_sizes(samples: int) -> list[int]:
    """k = 1, 2, 4, ... up to `samples`, and `samples` itself."""
    sizes = [2**i for i in range(samples.bit_length()) if 2**i <= samples]
    return sizes + ([samples] if sizes[-1] != samples else [])


def accuracy_metrics(results: list[dict], prefix: str) -> dict[str, float]:
    """`<prefix>/accuracy` overall and per category and difficulty, plus the format rate where it was scored. Items
    without an answer (correct is nan) are left out; none with one: nan."""
    results = [r for r in results if r["correct"] == r["correct"]]
    if not results:
        return {f"{prefix}/accuracy": float("nan")}
    metrics = {f"{prefix}/accuracy": sum(r["correct"] for r in results) / len(results)}
    formats = [r["format"] for r in results if r["format"] == r["format"]]
    if formats:
        metrics[f"{prefix}/format"] = sum(formats) / len(formats)
    for key in ("category", "difficulty"):
        groups = defaultdict(list)
        for r in results:
            if r.get(key):
                groups[r[key]].append(r["correct"])
        for name, values in groups.items():
            metrics[f"{prefix}/accuracy/{name}"] = sum(values) / len(values)
    return metrics


# ------------------------------------------------------------------------------------------ benchmarks


def benchmark_config(cfg: DictConfig, name: str) -> DictConfig:
    """The run's config with `data` replaced by the data option `name` (conf/data/<name>.yaml over its schema,
    then `eval.data.<name>`'s overrides, e.g. `+eval.data.mmar.root=/data/mmar`): what `data=<name>` composes on
    the command line, for one benchmark of `eval.benchmarks` or `final_eval.benchmarks`. Its paths come from the
    option's environment variable (MMAU_DIR, MMAR_DIR, MMSU_DIR, MMAU_PRO_DIR) unless overridden."""
    path = CONF / "data" / f"{name}.yaml"
    if name.startswith("_") or not path.exists():
        options = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if not p.stem.startswith("_"))
        raise ValueError(f"benchmark {name!r}: no data option conf/data/{name}.yaml; the options: {options}")
    option = OmegaConf.load(path)
    with open_dict(option):
        option.pop("defaults", None)  # _schema, _self_: the schema is merged below
    overrides = cfg.eval.data[name] if "data" in cfg.eval and name in cfg.eval.data else {}
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), option, overrides)
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.data = data
    OmegaConf.to_container(out.data, resolve=True)  # a bad path or version fails here, before any model is loaded
    return out


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
    if samples > 1:  # every sample's raw output and answer (model_output: the first sample's)
        record["model_raw_outputs"] = result["completions"]
        record["model_outputs"] = result["predictions"]
    return record


def write_predictions(out: Path, rule, rows: list[dict]) -> tuple[Path, Path]:
    """predictions.json (every benchmark) and the file its official script reads: the same JSON list, JSONL (MMSU)
    or a parquet (MMAU-Pro). Returns (predictions.json, the official file)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.json"
    write_atomic(path, json.dumps(rows, indent=2, ensure_ascii=False))
    official = out / rule.PREDICTIONS_FILE if rule else path
    if official.suffix == ".jsonl":
        write_atomic(official, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif official.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), official)
    return path, official


@dataclass
class BenchmarkScore:
    """One benchmark's scores, for the benchmark x category table: `metrics` (named under the caller's prefix),
    the headline accuracy and its categories (None, {} when the file has no answers), how many items it counts,
    the rule's printout (None: no official rule) and whether the headline is the official figure."""

    name: str
    metrics: dict[str, float]
    accuracy: float | None
    categories: dict[str, float] = field(default_factory=dict)
    scored: int = 0
    text: str | None = None
    official: bool = True
    answered: bool = True


def benchmark_score(
    name: str, data_format: str, rows: list[dict], results: list[dict], prefix: str, options: dict | None = None
) -> BenchmarkScore:
    """Score a benchmark's predictions records: by its official rule when its format has one (metrics
    `<prefix>/...` as the rule names them, avrl's protocol under `<prefix>/protocol/...`), else by the protocol
    (`<prefix>/accuracy`, per category). A file without answers: no accuracy. `options`: the rule's report
    arguments (MMAU-Pro's scorers: `rule_options`)."""
    rule = BENCHMARKS[data_format] if data_format in BENCHMARKS else None
    answered = any(rule.ANSWER_KEY in row for row in rows) if rule else True
    if not answered:
        return BenchmarkScore(name, {}, None, answered=False)
    if rule is None:
        metrics = accuracy_metrics(results, prefix)
        cats = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith(f"{prefix}/accuracy/")}
        scored = sum(r["correct"] == r["correct"] for r in results)
        return BenchmarkScore(name, metrics, metrics[f"{prefix}/accuracy"], cats, scored)
    report = rule.report(rows, **(options or {}))
    metrics = {f"{prefix}/{k}": v for k, v in report.metrics.items()}
    metrics.update(accuracy_metrics(results, f"{prefix}/protocol"))
    cats = {k.removeprefix(f"{report.by}/"): v for k, v in report.metrics.items() if k.startswith(f"{report.by}/")}
    return BenchmarkScore(
        name, metrics, report.metrics[report.headline], cats, report.scored, report.text, report.official
    )


def benchmark_table(scores: list[BenchmarkScore]) -> str:
    """Benchmark x category, in %: one row per benchmark (its headline accuracy, the items it counts, its
    categories: the first field its official script breaks accuracy down by), the columns every category any
    benchmark has, in order of first appearance; blank where a benchmark has no such category."""
    columns = list(dict.fromkeys(c for s in scores for c in s.categories))
    header = ["benchmark", "accuracy", "items", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in scores:
        if not s.answered:
            cells = [s.name, "no answers: predictions only", "", *("" for _ in columns)]
        else:
            mark = "" if s.official else " (not official)"
            cells = [s.name + mark, f"{s.accuracy * 100:.2f}", str(s.scored)]
            cells += [f"{s.categories[c] * 100:.2f}" if c in s.categories else "" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def audio_coverage(items, heard_seconds: float) -> dict[str, float]:
    """What the model did not hear of a benchmark with several or long clips (MMAU-Pro). Every clip of an item is
    in its prompt (avrl/models/processing.py); `items_with_several_clips` counts the items with more than one,
    `truncated_items` the items with a clip longer than `heard_seconds` (the processor's `heard_seconds`:
    data.max_audio_seconds for a family whose encoder takes long audio, else at most its 30 s window), cut there;
    `unknown_length` counts clips whose header soundfile cannot read."""
    several = truncated = unknown = 0
    for item in items:
        several += len(item.audio_paths) > 1
        durations = []
        for path in item.audio_paths:
            try:
                durations.append(soundfile.info(path).duration)
            except (RuntimeError, soundfile.LibsndfileError):
                unknown += 1
        truncated += any(d > heard_seconds for d in durations)
    return {"items_with_several_clips": several, "truncated_items": truncated, "unknown_length": unknown}


# ------------------------------------------------------------------ MMAU-Pro's model-based scorers


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class EmbeddingMatcher:
    """MMAU-Pro's closed-ended matching: the choice whose embedding is nearest (cosine) to the response's. A model
    with NV-Embed-v2's `encode(texts, instruction, max_length)` (the official one; trust_remote_code) is called as
    the official script calls it (empty instruction, max_length 4096); any other transformers encoder is
    mean-pooled over its last hidden states (a stand-in: a different figure from NV-Embed-v2's)."""

    def __init__(self, path: str, trust_remote_code: bool = False):
        self.device = _device()
        self.model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code).eval().to(self.device)
        self.native = callable(getattr(self.model, "encode", None))  # NV-Embed-v2's own encode
        self.tokenizer = None if self.native else AutoTokenizer.from_pretrained(path)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        if self.native:
            vectors = self.model.encode(texts, instruction="", max_length=4096)
        else:
            vectors = torch.stack([self._mean_pooled(t or self.tokenizer.eos_token) for t in texts])  # "": one token
        return F.normalize(vectors.float(), p=2, dim=1)

    def _mean_pooled(self, text: str) -> torch.Tensor:
        """One text alone (no padding, which would shift a left-padded text's positions)."""
        ids = self.tokenizer(text, return_tensors="pt").input_ids.to(self.device)
        return self.model(ids).last_hidden_state[0].mean(0)

    def __call__(self, response: str, choices: list[str]) -> int:
        return int(torch.argmax(self.embed([response]) @ self.embed(choices).T).item())


class TextJudge:
    """MMAU-Pro's judge of open answers: a chat model given the official system message and prompt, sampled as
    the official script samples it (do_sample, temperature 0.1, up to 512 new tokens; seeded here), one prompt at
    a time; returns each reply's text."""

    def __init__(
        self, path: str, max_new_tokens: int = 512, temperature: float = 0.1, seed: int = 0, trust_remote_code=False
    ):
        self.device = _device()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = self.model.eval().to(self.device)
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> list[str]:
        torch.manual_seed(self.seed)  # the judge's draws: the same replies on every call
        replies = []
        for prompt in prompts:
            messages = [{"role": "system", "content": mmau_pro.JUDGE_SYSTEM}, {"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer([text], return_tensors="pt").to(self.device).input_ids
            out = self.model.generate(
                ids,
                max_new_tokens=self.max_new_tokens,
                do_sample=True,
                temperature=self.temperature,
                pad_token_id=self.tokenizer.eos_token_id,
            )
            replies.append(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return replies


def rule_options(cfg: DictConfig) -> dict:
    """The official rule's report arguments for the run's data: MMAU-Pro's embedding matcher and judge when
    `eval.mmau_pro` names them (loaded here, once per call), else none (the string rule, open items unscored)."""
    if cfg.data.format != mmau_pro.NAME or "mmau_pro" not in cfg.eval:
        return {}
    settings, options = cfg.eval.mmau_pro, {}
    if settings.embedding_model:
        options.update(match=EmbeddingMatcher(settings.embedding_model, settings.trust_remote_code), label="official")
    if settings.judge_model:
        options["judge"] = TextJudge(
            settings.judge_model,
            settings.judge_max_new_tokens,
            settings.judge_temperature,
            cfg.seed,
            settings.trust_remote_code,
        )
    return options
