"""MMAU-Pro's scoring: sonalkum/MMAUPro, `evaluate_mmau_pro_comprehensive.py`.

The official script reads a parquet, the prediction from the column `model_output` (its `--model_output_column`
default; a missing value is read as ""), and scores three kinds of item by `category`:

- closed-ended (every category but `open` and `instruction following`, with more than one choice): the prediction
  is matched to the nearest choice by an embedding model, NV-Embed-v2 (`OFFICIAL_EMBEDDING_MODEL`: cosine
  similarity, empty instruction), and is right when that choice equals `answer`; accuracy per category;
- `open`: an LLM judge (Qwen2.5-7B-Instruct, `OFFICIAL_JUDGE_MODEL`) scores 1-5;
- `instruction following`: checks by `task_identifier` and `kwargs` (word counts, regexes, ...).

It prints a block per category and an "Overall Weighted Performance" over all three kinds.

avrl has no embedding model or judge yet, so here the closed-ended subset is scored by a STRING RULE: the choice
that MMAU's token rule accepts for the prediction (none when it accepts none or several), right when it is the
answer. That is NOT the official figure: the embedding always picks some choice, the string rule may pick none.
Its metrics are named `string_rule/...`. Extension point: `report(records, match=...)` takes any `ChoiceMatcher`
(response, choices) -> choice index; an embedding matcher (the official NV-Embed-v2, or a model chosen by config)
and a judge for `open` items plug in there (issue 29's second half); open and instruction-following items are
counted, not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from avrl.rules.mmau import mmau_match
from avrl.rules.tally import Report, accuracies, metric_name

NAME = "mmau_pro"
PREDICTION_KEY = "model_output"
ANSWER_KEY = "answer"
PREDICTIONS_FILE = "predictions.parquet"
OPEN, INSTRUCTION_FOLLOWING = "open", "instruction following"
OFFICIAL_EMBEDDING_MODEL = "nvidia/NV-Embed-v2"
OFFICIAL_JUDGE_MODEL = "Qwen/Qwen2.5-7B-Instruct"
BREAKDOWN = (("category", "Category-wise Accuracy (string rule, not the official figure):", ()),)

ChoiceMatcher = Callable[[str, list[str]], "int | None"]


def is_closed(record: dict) -> bool:
    """Scored by choice matching in the official script: not open or instruction following, and more than one
    choice (the script drops closed-ended items with fewer)."""
    choices = record.get("choices")
    return record.get("category") not in (OPEN, INSTRUCTION_FOLLOWING) and choices is not None and len(choices) > 1


def string_choice(response: str, choices: Sequence[str]) -> int | None:
    """The one choice MMAU's token rule accepts for the response; None when it accepts none or several."""
    accepted = [i for i, c in enumerate(choices) if mmau_match(response, c, list(choices))]
    return accepted[0] if len(accepted) == 1 else None


def score(response: str | None, record: dict, match: ChoiceMatcher = string_choice) -> bool | None:
    """One closed-ended response: its matched choice equals the answer. None (not scored here) for open and
    instruction-following items."""
    if not is_closed(record):
        return None
    choices = [str(c) for c in record["choices"]]
    index = match(response or "", choices)
    return index is not None and choices[index] == record[ANSWER_KEY]


def report(records: list[dict], match: ChoiceMatcher = string_choice, label: str = "string_rule") -> Report:
    """Closed-ended accuracy by `match` (the default: the string rule, metrics `string_rule/...`), per category;
    open and instruction-following items counted (`unscored/<category>`)."""
    results = [score(r.get(PREDICTION_KEY), r, match) for r in records]
    metrics, per_field = accuracies(records, results, BREAKDOWN)
    metrics = {f"{label}/{k}": v for k, v in metrics.items()}
    scored = [o for o in results if o is not None]
    title = "string rule, NOT the official figure (NV-Embed-v2 matching)" if match is string_choice else label
    lines = ["=" * 60, f"CLOSED-ENDED QUESTIONS: {title}"]
    for category, (c, n) in per_field["category"].items():
        lines.append(f"{category.upper()}: Accuracy: {c / n if n else 0:.4f} over {n}")
    lines.append(f"Closed-ended Accuracy: {sum(scored) / len(scored) if scored else 0:.4f} over {len(scored)}")
    for kind, model in ((OPEN, OFFICIAL_JUDGE_MODEL), (INSTRUCTION_FOLLOWING, "its instruction checks")):
        count = sum(r.get("category") == kind for r in records)
        if count:
            metrics[f"unscored/{metric_name(kind)}"] = float(count)
            lines.append(f"{kind.upper()}: {count} items not scored (the official script uses {model})")
    lines.append("=" * 60)
    return Report(
        metrics,
        "\n".join(lines),
        len(scored),
        headline=f"{label}/accuracy",
        by=f"{label}/category",
        official=match is not string_choice and label == "official",
    )
