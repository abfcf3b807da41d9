"""MMAU-Pro's scoring: sonalkum/MMAUPro, `evaluate_mmau_pro_comprehensive.py`.

The official script reads a parquet, the prediction from the column `model_output` (its `--model_output_column`
default; a missing value is read as ""), and scores three kinds of item by `category`:

- closed-ended (every category but `open` and `instruction following`, with more than one choice): the prediction
  is matched to the nearest choice by an embedding model, NV-Embed-v2 (`OFFICIAL_EMBEDDING_MODEL`: cosine
  similarity, empty instruction), and is right when that choice equals `answer`; accuracy per category;
- `open`: an LLM judge (Qwen2.5-7B-Instruct, `OFFICIAL_JUDGE_MODEL`) scores 1-5;
- `instruction following`: checks by `task_identifier` and `kwargs` (word counts, regexes, ...).

It prints a block per category and an "Overall Weighted Performance" over all three kinds.

Here: `report(records, match=..., judge=...)`. `match` is a `ChoiceMatcher` (response, choices) -> choice index:
an embedding matcher (avrl/scoring.py `EmbeddingMatcher`, the model chosen by `eval.mmau_pro.embedding_model`; the
official one is NV-Embed-v2) gives metrics `official/...`; without one the closed-ended subset is scored by a
STRING RULE (the choice MMAU's token rule accepts, none when it accepts none or several), metrics
`string_rule/...`, NOT the official figure (the embedding always picks some choice). `judge` (prompts -> replies,
avrl/scoring.py `TextJudge`, `eval.mmau_pro.judge_model`; official Qwen2.5-7B-Instruct) scores `open` items with
the official prompt and score parsing (`judge/...`); without one they are counted (`unscored/open`). Instruction
following is always scored by the official checks (`instruction_following/success_rate`), with one known
difference: the official script counts sentences with nltk's punkt tokenizer, avrl with a regex splitter
(`count_sentences`), which can differ on abbreviations and decimals. `weighted_performance` (the official script's
headline: each category's score weighted by its items; open = average overall score / 5) only when both models are
configured.
"""

from __future__ import annotations

import re
import statistics
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
Judge = Callable[[list[str]], list[str]]  # judge prompts -> the judge's replies
JUDGE_SYSTEM = "You are a helpful and objective evaluator."
JUDGE_CRITERIA = ("correctness", "relevance", "completeness", "clarity")


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


# ------------------------------------------------------------------ instruction following (the official checks)


def count_sentences(text: str) -> int:
    """Sentences as a regex splitter counts them: a run of text ended by . ! ? (or the end). The official script
    uses nltk's punkt (sent_tokenize), which keeps abbreviations such as "Dr." inside a sentence."""
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()])


def _alpha(text: str, keep: str = "") -> str:
    return re.sub(rf"[^a-zA-Z{keep}]", "", text).lower()


def _count_keyword(text: str, keyword: str) -> int:
    return len(re.findall(r"\b" + re.escape(keyword.lower()) + r"\b", text.lower()))


def _capital_words(text: str) -> int:
    return sum(word.isupper() for word in text.split())


def _sections(text: str, n, splitter: str) -> bool:
    parts = re.split(rf"\s*{re.escape(splitter)}\s*", text.strip())
    return len([p for p in parts if p.strip()]) == n


def follows_instruction(response: str, record: dict) -> bool:
    """The official check of an instruction-following item, by its `task_identifier` and `kwargs` (a record's
    plain dict: a missing argument takes the official default); an unknown identifier fails, as it does there."""
    task, kw = record.get("task_identifier") or "", record.get("kwargs") or {}
    words, sentences = len(response.split()), count_sentences(response)
    low = response.lower()
    n, n1, n2 = kw.get("N", 0), kw.get("N1", 0), kw.get("N2", 999)
    checks = {
        "Include Keywords": lambda: all(k.lower() in low for k in kw.get("keywords", "").split(", ")),
        "Keyword Frequency": lambda: _count_keyword(response, kw.get("keyword", "")) == n,
        "Forbidden Words": lambda: not any(w.lower() in low for w in kw.get("forbidden_words", "").split(", ")),
        "Number Paragraphs": lambda: len([p for p in response.split("***") if p.strip()]) == n,
        "Number Words (at least)": lambda: words >= n,
        "Number Words (at most)": lambda: words <= n,
        "Number Words (range)": lambda: n1 <= words <= n2,
        "Number Sentences (at least)": lambda: sentences >= n,
        "Number Sentences (at most)": lambda: sentences <= n,
        "Number Sentences (range)": lambda: n1 <= sentences <= n2,
        "Postscript": lambda: _alpha(kw.get("postscript_marker", "")) in _alpha(response),
        "Number Placeholder": lambda: len(re.findall(r"\[[^\]]+\]", response)) >= n,
        "Number Bullets": lambda: len(re.findall(r"(?:^|\n)\s*\*\s+", response)) == n,
        "Title": lambda: bool(re.search(r"<<[^>]+>>", response)),
        "Minimum Number Highlighted Section": lambda: len(re.findall(r"\*([^*]+)\*", response)) >= n,
        "Multiple Sections": lambda: _sections(response, n, kw.get("section_splitter", "")),
        # the official script passes the question as the prompt to repeat
        "Repeat Prompt": lambda: low.strip().startswith(str(record.get("question", "")).strip().lower()),
        "Two Responses": lambda: (lambda p: len(p) == 2 and p[0].lower().strip() != p[1].lower().strip())(
            response.split("******")
        ),
        "All Uppercase": lambda: response.isupper(),
        "All Lowercase": lambda: response.islower(),
        "All-capital Words (at least)": lambda: _capital_words(response) >= n,
        "All-capital Words (at most)": lambda: _capital_words(response) <= n,
        "All-capital Words (range)": lambda: n1 <= _capital_words(response) <= n2,
        "Start Checker": lambda: _alpha(response, " ").startswith(_alpha(kw.get("start_phrase", ""), " ")),
        "End Checker": lambda: _alpha(response, " ").endswith(_alpha(kw.get("end_phrase", ""), " ")),
        "Quotation": lambda: response.strip().startswith('"') and response.strip().endswith('"'),
        "No Commas": lambda: "," not in response,
    }
    return bool(checks[task]()) if task in checks else False


# ------------------------------------------------------------------ open answers (the official judge prompt)


def judge_prompt(question: str, reference: str, response: str) -> str:
    """The official judge prompt for an `open` item (its task context: general open-ended question answering)."""
    return f"""You are an expert evaluator for general open-ended question answering tasks. Please evaluate the \
quality of a model's response to a question.

Question: {question}

Reference Answer: {reference}

Model Response: {response}

Please evaluate the model response on the following criteria and provide scores from 1-5 (where 5 is best):

1. **Correctness**: How factually accurate is the response compared to the reference?
2. **Relevance**: How well does the response address the specific question asked?
3. **Completeness**: Does the response cover all important aspects mentioned in the reference?
4. **Clarity**: How clear and well-structured is the response?

For each criterion, provide:
- A score from 1-5
- A brief justification (1-2 sentences)

Format your response as:

CORRECTNESS: [score] - [justification]
RELEVANCE: [score] - [justification]{" "}
COMPLETENESS: [score] - [justification]
CLARITY: [score] - [justification]
OVERALL: [average score] - [overall assessment]"""


def judge_scores(reply: str) -> dict[str, float]:
    """The scores in a judge's reply, as the official script reads them: each criterion's integer after its
    label (3.0 where none), OVERALL's number; an OVERALL missing or equal to 3.0 is replaced by the mean of the
    four criteria."""
    scores = {}
    for name in (*JUDGE_CRITERIA, "overall"):
        number = r"(\d+(?:\.\d+)?)" if name == "overall" else r"(\d+)"
        found = re.search(rf"{name.upper()}:\s*{number}", reply, re.IGNORECASE)
        scores[name] = float(found.group(1)) if found else 3.0
    if scores["overall"] == 3.0:
        scores["overall"] = statistics.fmean(scores[c] for c in JUDGE_CRITERIA)
    return scores


def report(
    records: list[dict], match: ChoiceMatcher = string_choice, label: str = "string_rule", judge: Judge | None = None
) -> Report:
    """Closed-ended accuracy by `match` (the default: the string rule, metrics `string_rule/...`; an embedding
    matcher: label `official`), per category; instruction following by the official checks; `open` items by the
    `judge` (none: counted, `unscored/open`); the official weighted performance when `match` is official and a
    judge is given."""
    results = [score(r.get(PREDICTION_KEY), r, match) for r in records]
    metrics, per_field = accuracies(records, results, BREAKDOWN)
    metrics = {f"{label}/{k}": v for k, v in metrics.items()}
    scored = [o for o in results if o is not None]
    title = "string rule, NOT the official figure (NV-Embed-v2 matching)" if match is string_choice else label
    lines = ["=" * 60, f"CLOSED-ENDED QUESTIONS: {title}"]
    weighted = []  # (score, count) per category, as the official weighted performance takes them
    for category, (c, n) in per_field["category"].items():
        lines.append(f"{category.upper()}: Accuracy: {c / n if n else 0:.4f} over {n}")
        weighted.append((c / n if n else 0.0, n))
    lines.append(f"Closed-ended Accuracy: {sum(scored) / len(scored) if scored else 0:.4f} over {len(scored)}")
    following = [r for r in records if r.get("category") == INSTRUCTION_FOLLOWING]
    if following:
        passed = [follows_instruction(str(r.get(PREDICTION_KEY, "")), r) for r in following]  # str(): as there
        rate = sum(passed) / len(passed)
        metrics["instruction_following/success_rate"] = rate
        weighted.append((rate, len(passed)))
        lines.append(f"INSTRUCTION FOLLOWING: Success Rate: {rate:.3f} over {len(passed)} (sentences: regex splitter)")
    opens = [r for r in records if r.get("category") == OPEN]
    if opens and judge is not None:
        prompts = [
            judge_prompt(r.get("question", ""), r.get(ANSWER_KEY, ""), r.get(PREDICTION_KEY) or "") for r in opens
        ]
        all_scores = [judge_scores(reply) for reply in judge(prompts)]
        for name in (*JUDGE_CRITERIA, "overall"):
            metrics[f"judge/avg_{name}"] = statistics.fmean(s[name] for s in all_scores)
        metrics["judge/good_response_rate"] = sum(s["overall"] >= 4.0 for s in all_scores) / len(all_scores)
        metrics["judge/poor_response_rate"] = sum(s["overall"] <= 2.0 for s in all_scores) / len(all_scores)
        weighted.append((metrics["judge/avg_overall"] / 5.0, len(opens)))
        lines.append(f"OPEN: Avg Overall Score: {metrics['judge/avg_overall']:.3f}/5.0 over {len(opens)}")
    elif opens:
        metrics[f"unscored/{metric_name(OPEN)}"] = float(len(opens))
        lines.append(f"OPEN: {len(opens)} items not scored (the official script uses {OFFICIAL_JUDGE_MODEL})")
    official = match is not string_choice and label == "official" and (judge is not None or not opens)
    if official:
        total = sum(n for _, n in weighted)
        metrics["weighted_performance"] = sum(v * n for v, n in weighted) / total if total else 0.0
        lines.append(f"Overall Weighted Performance: {metrics['weighted_performance']:.4f}")
    lines.append("=" * 60)
    return Report(
        metrics,
        "\n".join(lines),
        len(scored),
        headline=f"{label}/accuracy",
        by=f"{label}/category",
        official=match is not string_choice and label == "official",
    )
