"""Scoring completions against the answers: the one path that validation (during training) and task=eval share,
and the one metrics function both report with."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from math import nan

from avrl.policy import Policy
from avrl.prompts import PromptSpec
from avrl.protocols import prediction


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
    "prediction", "completion" and "format" are the first sample's, "correct_per_sample" holds them all."""
    media = policy.encode(batch)  # once for all samples
    texts = []
    for k in range(samples):
        ids, mask = policy.generate(batch, media, 1, settings, keys=keys(k) if keys is not None else None)
        texts.append(policy.decode(ids, mask))
    results = []
    for i, item in enumerate(batch["items"]):
        completions = [t[i] for t in texts]
        judged = [prediction(protocol, prompt, c, item) for c in completions]  # each completion parsed once
        results.append(
            {
                "id": item.id,
                "category": item.category,
                "difficulty": item.difficulty,
                "correct": nan if judged[0][1] is None else float(judged[0][1]),  # nan: not scored
                "correct_per_sample": [nan if c is None else float(c) for _, c in judged],
                "prediction": judged[0][0],
                "completion": completions[0],
                "completions": completions,
                "format": format_reward([completions[0]], [item], prompt)[0] if format_reward else float("nan"),
            }
        )
    return results


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
