"""Reward functions and their weighted sum. Pure functions of (completions, items, prompt spec).

A reward function has the signature `fn(completions, items, prompt) -> list[float]`; users add their own through
`reward.functions.<name>._target_` in the config (see conf/reward/). Three rule sets ship, one config each:
- `reward=mmau` (avrl's default): MMAU's token rule on the last answer block, format matched after stripping;
- `reward=r1_aqa`: R1-AQA's released rules (src/utils/rewards.py), character for character;
- `reward=echoink`: EchoInk-R1's released rules (src/r1-v/src/open_r1/grpo.py), character for character.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from math_verify import parse, verify

from avrl.data.items import QAItem
from avrl.prompts import PromptSpec, final_answer, parse_letter, target_answer
from avrl.rules.mmau import mmau_match

RewardFn = Callable[[Sequence[str], Sequence[QAItem], PromptSpec], list[float]]


def is_correct(completion: str, item: QAItem, prompt: PromptSpec) -> bool:
    """Letter prompts: the named option is the gold one. Text prompts: MMAU's token rule against the choices. The
    answer is read as the prompt asks for it (an <answer> block, or a bare letter for prompt=mmsu)."""
    answer = final_answer(prompt, completion)
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


# ------------------------------------------------------------------------------------------------ R1-AQA
R1_AQA_ANSWER = re.compile(r"<answer>(.*?)</answer>")  # the first block; no DOTALL: a block spanning lines is none


def r1_aqa_accuracy(completions: Sequence[str], items: Sequence[QAItem], prompt: PromptSpec) -> list[float]:
    """R1-AQA's accuracy reward: math_verify's symbolic check of the completion against the solution
    `<answer>{gold}</answer>` first; failing that, the first answer block (or the whole completion when it has
    none), stripped, must equal the gold answer exactly."""
    rewards = []
    for completion, item in zip(completions, items, strict=True):
        gold = target_answer(prompt, item)
        solution = f"<answer>{gold}</answer>"
        reward = 0.0
        try:
            if float(verify(parse(completion), parse(solution))) > 0:
                reward = 1.0
        except Exception:  # as in the released code: any math_verify failure falls through to the string rule
            pass
        if reward == 0.0:
            found = R1_AQA_ANSWER.search(completion)
            student = found.group(1).strip() if found else completion.strip()
            reward = float(student == gold.strip())
        rewards.append(reward)
    return rewards


def r1_aqa_format(completions: Sequence[str], items: Sequence[QAItem], prompt: PromptSpec) -> list[float]:
    """R1-AQA's format reward: re.fullmatch of the prompt's pattern with DOTALL, on the completion as generated
    (no strip: a leading newline fails). The released code has the answer-only pattern; prompt=think uses its
    think pattern the same way (see the difference table in docs/papers.md)."""
    pattern = re.compile(prompt.format_pattern, re.DOTALL)
    return [float(pattern.fullmatch(c) is not None) for c in completions]


# ------------------------------------------------------------------------------------------------ EchoInk-R1
_ECHOINK_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)
# No DOTALL: the lookaheads reject a second <think> or <answer> only on the same line, as in the released code.
_ECHOINK_FORMAT = re.compile(
    r"^(?!.*<think>.*<think>)(?!.*<answer>.*<answer>)<think>[\s\S]+?</think>\s*<answer>[\s\S]+?</answer>$"
)


def echoink_accuracy(completions: Sequence[str], items: Sequence[QAItem], prompt: PromptSpec) -> list[float]:
    """EchoInk-R1's multiple-choice accuracy: the first answer block, stripped, equals the gold letter (or text,
    for a text prompt) exactly; a completion without one scores 0."""
    rewards = []
    for completion, item in zip(completions, items, strict=True):
        found = _ECHOINK_ANSWER.search(completion)
        rewards.append(float((found.group(1).strip() if found else "") == target_answer(prompt, item)))
    return rewards


def echoink_format(completions: Sequence[str], items: Sequence[QAItem], prompt: PromptSpec) -> list[float]:
    """EchoInk-R1's format reward: the stripped completion is one non-empty think block then one answer block."""
    return [float(_ECHOINK_FORMAT.fullmatch(c.strip()) is not None) for c in completions]


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
