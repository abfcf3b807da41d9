"""Reward functions and their weighted sum. Pure functions of (completions, items, prompt spec).

A reward function has the signature `fn(completions, items, prompt) -> list[float]`; users add their own through
`reward.functions.<name>._target_` in the config (see conf/reward/).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

from avrl.data.items import QAItem
from avrl.prompts import PromptSpec, extract_answer, parse_letter
from avrl.scoring import mmau_match

RewardFn = Callable[[Sequence[str], Sequence[QAItem], PromptSpec], list[float]]


def is_correct(completion: str, item: QAItem, prompt: PromptSpec) -> bool:
    """Letter prompts: the named option is the gold one. Text prompts: MMAU's token rule against the choices."""
    answer = extract_answer(completion)
    if answer is None:
        return False
    if prompt.answer_style == "letter":
        return parse_letter(answer, item.choices) == item.answer_index
    return mmau_match(answer, item.answer, item.choices)


def accuracy_reward(completions: Sequence[str], items: Sequence[QAItem], prompt: PromptSpec) -> list[float]:
    return [float(is_correct(c, it, prompt)) for c, it in zip(completions, items, strict=True)]


def format_reward(completions: Sequence[str], items: Sequence[QAItem], prompt: PromptSpec) -> list[float]:
    """1.0 when the whole completion (surrounding whitespace aside) matches the prompt's format pattern."""
    pattern = re.compile(prompt.format_pattern, re.DOTALL)
    return [float(pattern.fullmatch(c.strip()) is not None) for c in completions]


def score(
    functions: Mapping[str, RewardFn],
    weights: Mapping[str, float],
    completions: Sequence[str],
    items: Sequence[QAItem],
    prompt: PromptSpec,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every reward function, and each function's unweighted values for logging."""
    missing = set(functions) - set(weights)
    if missing:
        raise ValueError(f"reward.weights has no weight for {sorted(missing)}")
    per_function = {
        name: torch.tensor(fn(completions, items, prompt), dtype=torch.float32) for name, fn in functions.items()
    }
    total = torch.zeros(len(completions))
    for name, values in per_function.items():
        total += float(weights[name]) * values
    return total, per_function
