"""The benchmarks' official scoring rules (avrl/rules/), pinned on cases taken from each official script."""

import pytest

from avrl.rules import BENCHMARKS, mmar, mmau, mmau_pro, mmsu
from tests.support.helpers import mmau_reference


def test_every_benchmark_names_its_key_and_breakdown():
    assert {name: m.PREDICTION_KEY for name, m in BENCHMARKS.items()} == {
        "mmau": "model_output",
        "mmar": "answer_prediction",
        "mmsu": "response",
        "mmau_pro": "model_output",
    }
    assert [f for f, *_ in mmau.BREAKDOWN] == ["task", "difficulty", "sub-category"]
    assert [f for f, *_ in mmar.BREAKDOWN] == ["modality", "category", "sub-category"]
    assert {"category", "sub-category", "task_name"} == {f for f, *_ in mmsu.BREAKDOWN}
    assert [f for f, *_ in mmau_pro.BREAKDOWN] == ["category"]


def mmar_record(prediction=None, **extra):
    record = {
        "id": "x",
        "choices": ["Mountain Canyon", "Dense Forest", "Open Grassland", "City Streets"],
        "answer": "Open Grassland",
        "modality": "music",
        "category": "Cultural Layer",
        "sub-category": "Professional Knowledge and Reasoning",
        **extra,
    }
    if prediction is not None:
        record["answer_prediction"] = prediction
    return record


@pytest.mark.parametrize(
    "prediction", ["Open Grassland", "open grassland.", "an open grassland", "Open", "grassland or forest", ""]
)
def test_mmar_is_mmau_token_rule(prediction):
    record = mmar_record(prediction)
    assert mmar.score(prediction, record) == mmau_reference(prediction, record["answer"], record["choices"])


def test_mmar_report_skips_records_without_prediction_and_lists_fixed_groups():
    records = [
        mmar_record("Open Grassland"),
        mmar_record("Dense Forest", modality="speech", category="Semantic Layer", **{"sub-category": "S"}),
        mmar_record(None),  # no answer_prediction: the official script skips it (counted nowhere)
    ]
    report = mmar.report(records)
    assert report.scored == 2 and report.metrics["accuracy"] == 0.5
    assert report.metrics["modality/music"] == 1.0 and report.metrics["modality/speech"] == 0.0
    # the official script's fixed dicts: every modality and layer printed, empty ones at 0 over 0
    assert "mix-sound-music-speech : 0.00% over 0 samples" in report.text
    assert "Signal Layer : 0.00% over 0 samples" in report.text
    assert "Total Accuracy: 50.00% over 2 samples" in report.text


def test_mmau_report_prints_sub_category_and_difficulty():
    def rec(pred, answer, task, diff, sub):
        return {"choices": ["Man", "Woman"], "answer": answer, "task": task, "difficulty": diff,
                "sub-category": sub, "model_output": pred}  # fmt: skip

    records = [rec("Man", "Man", "speech", "easy", "a"), rec("Man", "Woman", "speech", "hard", "b")]
    records.append({k: v for k, v in rec("", "Man", "music", "easy", "a").items() if k != "sub-category"})
    report = mmau.report(records)
    assert report.metrics["accuracy"] == pytest.approx(1 / 3)
    assert report.metrics["sub-category/a"] == 1.0 and report.metrics["sub-category/b"] == 0.0
    assert "sound : 0.00% over 0 samples" in report.text and "medium : 0.00% over 0 samples" in report.text
    assert "a : 100.00% over 1 samples" in report.text  # the record without sub-category counts only elsewhere


# MMSU: (response, the letter mmsu_evaluation.py reads). Stripped, newlines removed; first character if A-D,
# else the second-to-last if A-D, else dropped; "" and "None" get the previous record's letter.
LETTER_CASES = [
    ("A", "A"),
    ("B. a dog barking", "B"),
    ("  C\n", "C"),
    ("The answer is D.", "D"),
    ("(B)", "B"),
    ("Answer: C", "A"),  # the first character is 'A' (of "Answer"): read as A
    ("The answer is C", None),  # second-to-last is a space: dropped
    ("b", None),  # lower case, one character: dropped
    ("Ab", "A"),
    ("the answer is\nB.", "B"),  # newline removed, "...isB." -> B
    ("E", None),
    ("", mmsu.EMPTY),
    ("   ", mmsu.EMPTY),
    ("None", mmsu.EMPTY),
]


@pytest.mark.parametrize("response,expected", LETTER_CASES)
def test_mmsu_letter(response, expected):
    assert mmsu.letter(response) == expected


def mmsu_record(response, answer_gt="a cat", **extra):
    return {"choice_a": "a dog", "choice_b": "a cat", "choice_c": "a bird", "choice_d": "a cow",
            "answer_gt": answer_gt, "response": response, "task_name": "t", "category": "Perception",
            "sub-category": "Perception", **extra}  # fmt: skip


def test_mmsu_official_and_strict_accuracy():
    records = [
        mmsu_record("B"),  # right
        mmsu_record("The answer is B"),  # dropped: in no denominator
        mmsu_record(""),  # empty: the previous *read* letter (B) reused by the official script, right
        mmsu_record("A", answer_gt="a dog", category="Reasoning", **{"sub-category": "Reasoning"}),  # right
        mmsu_record("D"),  # wrong
        mmsu_record("C", answer_gt="a hen"),  # answer_gt matches no choice: wrong
    ]
    results = mmsu.outcomes(records)
    assert results == [True, None, True, True, False, False]
    report = mmsu.report(records)
    assert report.metrics["accuracy"] == pytest.approx(3 / 5)  # official: the dropped one out
    assert report.metrics["accuracy_strict"] == pytest.approx(3 / 6)
    assert report.metrics["dropped"] == 1.0
    assert report.metrics["category/Perception"] == pytest.approx(2 / 4)
    assert "Overall Accuracy: 0.6000" in report.text and "Total count: 5" in report.text
    assert "Category: Reasoning, Sub-category: Reasoning, Accuracy: 1.0000" in report.text


def test_mmsu_empty_first_response_is_wrong_not_a_crash():
    # the official script raises NameError here (no letter read yet); avrl counts it wrong
    assert mmsu.outcomes([mmsu_record("None"), mmsu_record("B")]) == [False, True]


def test_mmsu_missing_choice_compares_as_empty_string():
    record = mmsu_record("D", answer_gt="a dog")
    del record["choice_d"]
    assert mmsu.score("D", record) is False


def pro_record(prediction, category="sound", choices=("Dog barking", "Cat meowing", "Bird chirping"), **extra):
    return {"category": category, "choices": None if choices is None else list(choices), "answer": "Cat meowing",
            "model_output": prediction, **extra}  # fmt: skip


@pytest.mark.parametrize(
    "prediction,expected",
    [
        ("Cat meowing", True),
        ("a cat meowing softly", True),
        ("Dog barking", False),
        ("cat or dog", False),  # the token rule accepts no choice: wrong (the embedding would pick one)
        ("", False),
    ],
)
def test_mmau_pro_string_rule_on_closed_ended(prediction, expected):
    assert mmau_pro.score(prediction, pro_record(prediction)) is expected


def test_mmau_pro_open_instruction_following_and_single_choice_are_not_scored():
    assert mmau_pro.score("anything", pro_record("x", category="open", choices=None)) is None
    assert mmau_pro.score("anything", pro_record("x", category="instruction following", choices=())) is None
    assert mmau_pro.score("Cat meowing", pro_record("x", choices=("Cat meowing",))) is None  # official: filtered


def test_mmau_pro_report_is_labelled_and_takes_another_matcher():
    records = [pro_record("Cat meowing"), pro_record("Dog barking", category="music"), pro_record("x", "open", None)]
    report = mmau_pro.report(records)
    assert report.metrics["string_rule/accuracy"] == 0.5 and report.metrics["unscored/open"] == 1.0
    assert "NOT the official figure" in report.text
    always_second = mmau_pro.report(records, match=lambda response, choices: 1, label="nearest")
    assert always_second.metrics["nearest/accuracy"] == 1.0  # the extension point: any (response, choices) matcher
