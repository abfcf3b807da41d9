"""What the benchmarks' official scripts do alike: count correct/total per value of a record field (in the order
the script prints them) and print "name : xx.xx% over n samples" tables; metric names MLflow accepts."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_NOT_METRIC = re.compile(r"[^A-Za-z0-9_\-. /:]")


@dataclass
class Report:
    """A benchmark's scores: `metrics` (names relative to the caller's prefix: `accuracy`, `<field>/<value>`, ...),
    `text` (the table its official script prints), `scored` (how many records entered the official figure), and
    for the benchmark x category table: `headline` (the metric of its overall figure), `by` (the prefix of its
    category metrics: the first field the official script breaks accuracy down by) and `official` (whether the
    headline is the official script's figure)."""

    metrics: dict[str, float]
    text: str
    scored: int
    headline: str = "accuracy"
    by: str = ""
    official: bool = True


def metric_name(value: str) -> str:
    """A field value as a metric name MLflow accepts (alphanumerics, `_-. /:`; anything else becomes `_`)."""
    return _NOT_METRIC.sub("_", str(value))


def groups(records: Sequence[dict], outcomes: Sequence[bool | None], key: str, order: Iterable[str] = ()):
    """{value: [correct, total]} over the records whose outcome is not None and that hold `key`: the values of
    `order` first (listed even when no record has them, as the official scripts' fixed dicts are), then the others
    in the order they first appear."""
    counts: dict[str, list[int]] = {name: [0, 0] for name in order}
    for record, outcome in zip(records, outcomes):
        if outcome is None or record.get(key) is None:
            continue
        count = counts.setdefault(record[key], [0, 0])
        count[0] += int(outcome)
        count[1] += 1
    return counts


def percent(correct: int, total: int) -> float:
    return correct / total * 100 if total > 0 else 0.0


def table(title: str, counts: dict[str, list[int]]) -> list[str]:
    """One block of MMAU's and MMAR's printout."""
    lines = ["*" * 30, title]
    lines += [f"{name} : {percent(c, n):.2f}% over {n} samples" for name, (c, n) in counts.items()]
    return lines


def accuracies(records, outcomes, breakdown) -> tuple[dict[str, float], dict[str, dict[str, list[int]]]]:
    """`accuracy` and `<field>/<value>` over the records with an outcome (None: counted nowhere), and the counts
    per field. `breakdown`: (field, title, order) triples."""
    scored = [o for o in outcomes if o is not None]
    metrics = {"accuracy": sum(scored) / len(scored) if scored else float("nan")}
    per_field = {}
    for key, _, order in breakdown:
        counts = groups(records, outcomes, key, order)
        per_field[key] = counts
        for name, (c, n) in counts.items():
            if n:
                metrics[f"{metric_name(key)}/{metric_name(name)}"] = c / n
    return metrics, per_field
