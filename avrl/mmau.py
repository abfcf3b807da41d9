"""MMAU's answer-matching rule (the benchmark's own evaluation.py), as a pure function."""

from __future__ import annotations

import re

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
