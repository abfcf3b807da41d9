"""MMSU's official scoring rule: dingdongwang/MMSU_Bench, `mmsu_evaluation.py` (prompt and record keys from its
`mmsu_inference.py`).

The script reads JSONL (one record per line), the model's output from `response`, strips it and removes its
newlines, and reads a letter: the first character when it is A-D, else the second-to-last character when that is
A-D ("The answer is B."). A response with neither is *dropped*: counted neither right nor wrong, left out of every
denominator. A response that is empty or the string "None" gets no letter of its own: the script reuses the letter
of the record before it (a variable left over from the previous iteration) and counts it; on the file's first
record that raises a NameError. The letter is right when its choice (`choice_a`..`choice_d`) equals `answer_gt`,
as strings. Printed: accuracy per `category` and `sub-category` (its nesting), per `category`, overall, the count.

Two figures: `accuracy` (official: dropped responses out of the denominator) and `accuracy_strict` (avrl's: every
record counted, a dropped or empty response wrong). avrl also reports accuracy per `task_name` (the 47 tasks).
"""

from __future__ import annotations

from avrl.rules.tally import Report, accuracies, groups

NAME = "mmsu"
PREDICTION_KEY = "response"
ANSWER_KEY = "answer_gt"
PREDICTIONS_FILE = "predictions.jsonl"
CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")
BREAKDOWN = (("category", "Category", ()), ("sub-category", "Sub-category", ()), ("task_name", "Task", ()))
# The official inference script's prompt (mmsu_inference.py), `{question}` and `{options}` ("A. ..\nB. .." lines).
PROMPT = (
    "Choose the most suitable answer from options A, B, C, and D to respond the question in next line, **you should "
    "only choose A or B or C or D.** Do not provide any additional explanations or content.\n\nQuestion: {question}"
    "\n\n{options}"
)
EMPTY = ""  # letter(): an empty or "None" response, which the official script gives the previous record's letter


def letter(response: str) -> str | None:
    """The letter the official script reads from a response: "A".."D"; None when it drops the response; EMPTY
    for an empty (after stripping) or "None" response."""
    predict = response.strip().replace("\n", "")
    if predict == "None" or not predict:
        return EMPTY
    if predict[0] in "ABCD":
        return predict[0]
    if len(predict) > 1 and predict[-2] in "ABCD":
        return predict[-2]
    return None


def is_right(choice_letter: str, record: dict) -> bool:
    return record.get(CHOICE_KEYS["ABCD".index(choice_letter)], "") == record[ANSWER_KEY]


def score(response: str, record: dict, previous: str | None = None) -> bool | None:
    """The official rule on one response: None when dropped; an empty response is scored with `previous` (the
    letter the script read for the record before; none: wrong, where the official script stops with an error)."""
    found = letter(response)
    if found == EMPTY:
        return is_right(previous, record) if previous else False
    return None if found is None else is_right(found, record)


def outcomes(records: list[dict]) -> list[bool | None]:
    """The official outcome of each record of a predictions file, in its order (the left-over letter included)."""
    results, previous = [], None
    for r in records:
        found = letter(r[PREDICTION_KEY])
        results.append(score(r[PREDICTION_KEY], r, previous))
        if found:
            previous = found
    return results


def report(records: list[dict]) -> Report:
    results = outcomes(records)
    metrics, per_field = accuracies(records, results, BREAKDOWN)
    dropped = sum(o is None for o in results)
    metrics["accuracy_strict"] = sum(bool(o) for o in results) / len(results) if results else float("nan")
    metrics["dropped"] = float(dropped)
    lines = []
    for category in per_field["category"]:
        inside = [(r, o) for r, o in zip(records, results) if r.get("category") == category]
        subs = groups([r for r, _ in inside], [o for _, o in inside], "sub-category")
        for sub, (c, n) in subs.items():
            lines.append(f"Category: {category}, Sub-category: {sub}, Accuracy: {c / n if n else 0:.4f}")
    for category, (c, n) in per_field["category"].items():
        lines.append(f"Category: {category}, Average Accuracy: {c / n if n else 0:.4f}")
    scored = [o for o in results if o is not None]
    lines.append(f"Overall Accuracy: {sum(scored) / len(scored) if scored else 0:.4f}")
    lines.append(f"Total count: {len(scored)}")
    lines.append(
        f"avrl: strict accuracy (the {dropped} dropped responses counted wrong): "
        f"{metrics['accuracy_strict']:.4f} over {len(results)}"
    )
    for task, (c, n) in per_field["task_name"].items():
        lines.append(f"Task: {task}, Accuracy: {c / n if n else 0:.4f} over {n}")
    return Report(metrics, "\n".join(lines), len(scored), by="category")
