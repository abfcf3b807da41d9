"""MMAU's official scoring rule: Sakshi113/MMAU, `evaluation.py` (`string_match`), as pure functions.

The script reads a JSON list, the prediction from `model_output`, skips records without that key (counted nowhere)
and prints accuracy by `task` (sound, music, speech), by `difficulty` (easy, hard, medium) and by `sub-category`,
then the total. Its token rule: a prediction is correct iff it holds every token (`\\b\\w+\\b`, lower case) of the
answer and none of the tokens that the other choices have and the answer lacks; an empty prediction is wrong.
The test set (9,000 items) is published without answers: it is read for predictions only (no accuracy).
"""

from __future__ import annotations

import re

from avrl.rules.tally import Report, accuracies, metric_name, percent, table

NAME = "mmau"
PREDICTION_KEY = "model_output"
ANSWER_KEY = "answer"
PREDICTIONS_FILE = "predictions.json"
# (field, the official script's title, the values it always lists, in its order)
BREAKDOWN = (
    ("task", "Task-wise Accuracy:", ("sound", "music", "speech")),
    ("difficulty", "Difficulty-wise Accuracy:", ("easy", "hard", "medium")),
    ("sub-category", "Sub-category-wise Accuracy:", ()),
)

_WORD = re.compile(r"\b\w+\b")


def tokens(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def mmau_match(prediction: str, answer: str, choices: list[str]) -> bool:
    """True iff the prediction holds every token of the answer and none of the tokens that the other choices
    have and the answer lacks. An empty prediction is wrong."""
    predicted = tokens(prediction)
    if not predicted:
        return False
    gold = tokens(answer)
    wrong: set[str] = set()
    for choice in choices:
        choice_tokens = tokens(choice)
        if choice_tokens != gold:
            wrong |= choice_tokens - gold
    return gold <= predicted and predicted.isdisjoint(wrong)


def score(response: str, record: dict) -> bool:
    """The official rule on one response: `string_match(record["answer"], response, record["choices"])`."""
    return mmau_match(response, record[ANSWER_KEY], record["choices"])


def token_rule_report(records: list[dict], breakdown, key: str) -> Report:
    """MMAU's printout (MMAR prints the same with its own fields): a block per breakdown field, then the total."""
    results = [mmau_match(r[key], r[ANSWER_KEY], r["choices"]) if key in r else None for r in records]
    metrics, per_field = accuracies(records, results, breakdown)
    lines = []
    for field, title, _ in breakdown:
        lines += table(title, per_field[field])
    scored = [o for o in results if o is not None]
    lines += ["*" * 30, f"Total Accuracy: {percent(sum(scored), len(scored)):.2f}% over {len(scored)} samples"]
    lines.append("*" * 30)
    return Report(metrics, "\n".join(lines), len(scored), by=metric_name(breakdown[0][0]))


def report(records: list[dict]) -> Report:
    return token_rule_report(records, BREAKDOWN, PREDICTION_KEY)
