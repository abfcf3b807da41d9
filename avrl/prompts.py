"""Prompt rendering and final-answer parsing (pure functions), and the prompts a config names (the templates live in
conf/prompt/*.yaml)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from avrl.config import conf_path
from avrl.data.items import LETTERS, DataError, QAItem
from avrl.rules import mmsu

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A bare option letter, optionally in parentheses and followed by '.', ':' or ')': "B", "(B)", "B." ...
_LETTER_ONLY = re.compile(r"^\(?([A-Z])\)?[.:)]?$")
# An option written out the way it was shown: "B. a dog barking", "(B) a dog barking".
_LETTER_AND_TEXT = re.compile(r"^\(?([A-Z])(?:\)|[.:])\s+(.+)$", re.DOTALL)
REPLY_FORMATS = ("answer_tags", "bare_letter")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt style: how the question is shown and what the answer must look like."""

    name: str
    # fields: {question}, {choices} (Python list repr, R1-AQA), {options} (lettered, one per line), {options_abcd}
    # (always the four lines A-D, an absent choice written "None": MMSU's mmsu_inference.py:41)
    template: str
    eval_template: str | None = None  # task=eval's template when the paper evaluates with another one (EchoInk)
    answer_style: str = "text"  # "text": the choice's text; "letter": the option letter
    format_pattern: str = r"<answer>.*?</answer>"
    sft_target: str = "<answer>{answer}</answer>"  # what SFT trains on; {answer} is the gold answer
    # A system turn before the user's; None: the chat template's own default (Qwen2-Audio and Qwen2.5-Omni write
    # "You are a helpful assistant.", Qwen3-Omni none).
    system: str | None = None
    # How the reply carries its answer: "answer_tags" (in <answer></answer>; avrl's strict protocol reads the last
    # block) or "bare_letter" (the reply is the letter itself, read as MMSU's scorer reads it: protocol `mmsu`).
    reply_format: str = "answer_tags"

    def __post_init__(self):
        if self.answer_style not in ("text", "letter"):
            raise ValueError(
                f"prompt {self.name!r}: answer_style must be 'text' or 'letter', got {self.answer_style!r}"
            )
        if self.reply_format not in REPLY_FORMATS:
            raise ValueError(
                f"prompt {self.name!r}: reply_format must be one of {REPLY_FORMATS}, got {self.reply_format!r}"
            )
        if self.reply_format == "bare_letter" and self.answer_style != "letter":
            raise ValueError(f"prompt {self.name!r}: reply_format 'bare_letter' needs answer_style 'letter'")


def render_question(spec: PromptSpec, item: QAItem, for_eval: bool = False) -> str:
    """The user turn's text. {options} are the data file's own lettered options when it has them (EchoInk's
    "A. ..."), else "A. <choice>" lines; {choices} is the Python list's repr, as R1-AQA's f-string writes it;
    {options_abcd} the four lines A-D that MMSU's script always writes."""
    options = "\n".join(item.options_text or [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)])
    template = spec.eval_template if for_eval and spec.eval_template else spec.template
    abcd = _options_abcd(spec, item) if "{options_abcd}" in template else ""
    return template.format(question=item.question, choices=str(list(item.choices)), options=options, options_abcd=abcd)


def _options_abcd(spec: PromptSpec, item: QAItem) -> str:
    """The lines "A. <choice_a>" .. "D. <choice_d>", an absent choice written None (mmsu_inference.py:37-41)."""
    if len(item.choices) > 4:
        raise DataError(
            f"{item.source or item.id}: {len(item.choices)} choices, but prompt {spec.name!r} shows options A-D only"
        )
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate([*item.choices, *[None] * 4][:4]))


def target_answer(spec: PromptSpec, item: QAItem) -> str:
    """What goes inside <answer></answer> for the gold answer."""
    return LETTERS[item.answer_index] if spec.answer_style == "letter" else item.answer


def extract_answer(completion: str) -> str | None:
    """Content of the last <answer>...</answer> block, stripped; None when there is none."""
    found = ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def bare_letter(reply: str) -> str | None:
    """The letter MMSU's scorer reads from a bare reply (avrl/rules/mmsu.py): its first character if A-D, else its
    second-to-last ("The answer is B."); None when it reads none (an empty reply included)."""
    return mmsu.letter(reply) or None


def final_answer(spec: PromptSpec, completion: str) -> str | None:
    """The reply's final answer as the prompt asks for it: the last answer block, or the bare letter; None if none."""
    return bare_letter(completion) if spec.reply_format == "bare_letter" else extract_answer(completion)


def parse_letter(answer: str, choices: list[str]) -> int | None:
    """Index of the option an answer names by letter or by exact text; None if it names none.

    Unlike EchoInk-R1's parser, a word such as "a" or "A dog" is not read as option A: only a bare capital
    letter, or a letter with its punctuation followed by text, counts.
    """
    m = _LETTER_ONLY.match(answer) or _LETTER_AND_TEXT.match(answer)
    if m and LETTERS.index(m.group(1)) < len(choices):
        return LETTERS.index(m.group(1))
    folded = [c.strip().casefold() for c in choices]
    key = answer.strip().casefold()
    return folded.index(key) if key and key in folded else None


def predicted_text(spec: PromptSpec, completion: str, choices: list[str]) -> str:
    """The final answer as text, for MMAU-style predictions: a letter becomes its choice's text."""
    answer = final_answer(spec, completion)
    if answer is None:
        return ""
    if spec.answer_style == "letter":
        index = parse_letter(answer, choices)
        return choices[index] if index is not None else ""
    return answer


def prompt_spec(cfg: DictConfig) -> PromptSpec:
    """The run's prompt (conf/prompt/<name>.yaml, the `prompt` group)."""
    return PromptSpec(**OmegaConf.to_container(cfg.prompt, resolve=True))


def prompt_mix(cfg: DictConfig) -> list[PromptSpec]:
    """data.prompt_mix: the train split shown in these prompt formats (conf/prompt/<name>.yaml), one per item."""
    return [
        PromptSpec(**OmegaConf.to_container(OmegaConf.load(conf_path(f"prompt/{name}.yaml")), resolve=True))
        for name in cfg.data.prompt_mix or []
    ]
