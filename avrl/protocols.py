"""Evaluation protocols: how a completion becomes a prediction, and when it counts as correct (`eval.protocol`).

- `strict` (avrl's): the last answer block; a letter prompt's letter is mapped to its choice; no block, no answer.
  Correct by MMAU's token rule (letter prompts: the named option is the gold one).
- `r1_aqa`: R1-AQA's src/test_mmau.py: the first `<answer>(.*?)</answer>` (no DOTALL), or the whole output when
  there is none, stripped; scored by MMAU's token rule (MMAU's evaluation.py).
- `echoink`: EchoInk-R1's src/omniInstruct-v1_eval_valid.py: `<answer>\\s*([A-D])\\s*</answer>` (any case), else
  the first isolated letter A-D anywhere in the output (the article "a" counts as A), else "?"; correct when it is
  the gold letter.
- `mmsu`: MMSU's mmsu_evaluation.py:35-52 on a bare reply (prompt=mmsu): the letter is its first character if A-D,
  else its second-to-last ("The answer is B."); correct when that letter's choice is the gold one. A reply with
  neither is *wrong* here (avrl's count; the official figure leaves it out: avrl/rules/mmsu.py reports both) and
  its prediction is the reply itself, so that the official scorer drops it too. `strict` reads a prompt with
  `reply_format: bare_letter` this way.
"""

from __future__ import annotations

import re

from avrl.data.items import LETTERS, QAItem
from avrl.prompts import PromptSpec, bare_letter, extract_answer, predicted_text
from avrl.rewards import R1_AQA_ANSWER, is_correct
from avrl.rules.mmau import mmau_match

PROTOCOLS = ("strict", "r1_aqa", "echoink", "mmsu")
_ECHOINK_TAGGED = re.compile(r"<answer>\s*([A-D])\s*</answer>", re.I)
_ECHOINK_LOOSE = re.compile(r"\b([A-D])\b", re.I)


def prediction(protocol: str, prompt: PromptSpec, completion: str, item: QAItem) -> tuple[str, bool | None]:
    """(model_output, correct): the prediction as MMAU's predictions file holds it (the choice's text; a letter
    protocol's letter is mapped to its choice, or kept when it names none) and whether it is right (None for an
    item without an answer index: a prediction-only file, an open question)."""
    if item.answer_index is None:
        unscored = QAItem(item.id, item.question, item.choices, 0) if item.choices else None
        if unscored is None:  # an open question: the answer block's text, or the whole output
            return (extract_answer(completion) or completion).strip(), None
        return prediction(protocol, prompt, completion, unscored)[0], None
    if protocol == "mmsu" or (protocol == "strict" and prompt.reply_format == "bare_letter"):
        return _mmsu(completion, item)
    if protocol == "strict":
        return predicted_text(prompt, completion, item.choices), is_correct(completion, item, prompt)
    if protocol == "r1_aqa":
        found = R1_AQA_ANSWER.search(completion)
        answer = (found.group(1) if found else completion).strip()
        return answer, mmau_match(answer, item.answer, item.choices)
    if protocol == "echoink":
        found = _ECHOINK_TAGGED.search(completion) or _ECHOINK_LOOSE.search(completion)
        letter = found.group(1).upper() if found else "?"
        index = LETTERS.index(letter) if found else None
        text = item.choices[index] if index is not None and index < len(item.choices) else letter
        return text, index == item.answer_index
    raise ValueError(f"eval.protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _mmsu(completion: str, item: QAItem) -> tuple[str, bool]:
    """The letter's choice text (the letter itself past the choices; the reply when no letter is read, as
    prediction_record then hands the official scorer the reply to drop) and whether it is the gold choice."""
    letter = bare_letter(completion)
    if letter is None:
        return completion.strip(), False
    index = LETTERS.index(letter)
    if index >= len(item.choices):  # "D" on a three-choice item: MMSU's choice_d is absent, never the answer
        return letter, False
    return item.choices[index], item.choices[index] == item.answer  # MMSU compares the texts
