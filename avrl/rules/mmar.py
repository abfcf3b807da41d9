"""MMAR's official scoring rule: ddlBoJack/MMAR, `code/evaluation.py`.

The script reads a JSON list (`.json`) or JSONL (`.jsonl`), the prediction from `answer_prediction`, skips records
without that key (counted nowhere), scores with MMAU's token rule (its `string_match` is MMAU's, unchanged) and
prints accuracy by `modality` (7 values, a fixed list), by `category` (the four layers) and by `sub-category`.
"""

from __future__ import annotations

from avrl.rules.mmau import mmau_match, token_rule_report
from avrl.rules.tally import Report

NAME = "mmar"
PREDICTION_KEY = "answer_prediction"
ANSWER_KEY = "answer"
PREDICTIONS_FILE = "predictions.json"
MODALITIES = (
    "sound",
    "music",
    "speech",
    "mix-sound-music",
    "mix-sound-speech",
    "mix-music-speech",
    "mix-sound-music-speech",
)
LAYERS = ("Signal Layer", "Perception Layer", "Semantic Layer", "Cultural Layer")
BREAKDOWN = (
    ("modality", "Modality-wise Accuracy:", MODALITIES),
    ("category", "Category-wise Accuracy:", LAYERS),
    ("sub-category", "Sub-category-wise Accuracy:", ()),
)


def score(response: str, record: dict) -> bool:
    """The official rule on one response: MMAU's token rule against `answer` and `choices`."""
    return mmau_match(response, record[ANSWER_KEY], record["choices"])


def report(records: list[dict]) -> Report:
    return token_rule_report(records, BREAKDOWN, PREDICTION_KEY)
